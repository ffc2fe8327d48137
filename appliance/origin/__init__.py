"""The central origin: campaign store, publishing, rollouts and the fleet API."""
