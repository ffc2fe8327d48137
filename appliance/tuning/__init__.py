"""Host tuning for a thread-per-core engine: hugepages, NUMA, NIC IRQs, RPS/XPS, sysctl, CPU
power and THP, as knobs that are planned, applied, verified, rolled back and kept from
drifting. `host` reads the machine (or a fake tree under --root), `knobs` are the settings,
`plan` turns the configuration into knobs, `drift` watches them from the supervisor."""
