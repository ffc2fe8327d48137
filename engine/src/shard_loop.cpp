// A shard: its listeners, its edge-triggered epoll loop, and each connection's reads, parsing
// and writes. What a parsed request gets as its answer is routes.cpp's.
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <sched.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>

#include "clock.hpp"
#include "response.hpp"
#include "server.hpp"
#include "shard_conn.hpp"

namespace adpop {

Shard::Shard(Engine& engine, std::uint32_t index, int cpu)
    : engine_(engine),
      index_(index),
      cpu_(cpu),
      pacer_(engine.pacing(), index),
      spool_(std::make_unique<Spool>(engine.options().spool_dir, index, engine.options().spool_segment_bytes,
                                     engine.options().spool_segment_age_s)) {}

Shard::~Shard() {
  for (auto& c : conns_)
    if (c && !c->closed) ::close(c->fd);
  for (int fd : listen_fds_) ::close(fd);
  if (metrics_fd_ >= 0) ::close(metrics_fd_);
  if (epoll_fd_ >= 0) ::close(epoll_fd_);
}

bool Shard::start(std::string* error) {
  const EngineOptions& o = engine_.options();
  cap_ = std::max<std::uint32_t>(1, o.max_connections / std::max<std::uint32_t>(1, o.shards));
  // A fixed receive buffer (inherited by accepted sockets) that holds the largest request we
  // accept: ad requests are small, so the kernel's per-read buffer autotuning is work for
  // nothing, and a flood of connections cannot grow their buffers.
  const int rcvbuf =
      static_cast<int>(std::max<std::size_t>(64 * 1024, o.http.max_header_bytes + o.http.max_body_bytes));
  for (const Endpoint& ep : o.listen) {
    // Each shard has its own listener on the same port: the kernel spreads connections, and
    // no accept queue is shared between threads.
    const int fd = open_listener(ep, true, rcvbuf, error);
    if (fd < 0) return false;
    listen_fds_.push_back(fd);
  }
  // One shard answers the scrapes: they are rare, and one listener needs no SO_REUSEPORT.
  if (index_ == 0 && o.metrics.port != 0) {
    metrics_fd_ = open_listener(o.metrics, false, 0, error);
    if (metrics_fd_ < 0) return false;
  }
  epoll_fd_ = epoll_create1(EPOLL_CLOEXEC);
  if (epoll_fd_ < 0) {
    *error = std::string("epoll_create1: ") + std::strerror(errno);
    return false;
  }
  for (int fd : listen_fds_) watch_listener(epoll_fd_, fd);
  if (metrics_fd_ >= 0) watch_listener(epoll_fd_, metrics_fd_);
  thread_ = std::thread([this] { run(); });
  return true;
}

void Shard::join() {
  if (thread_.joinable()) thread_.join();
}

void Shard::run() {
  if (cpu_ >= 0) {
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu_, &set);
    pthread_setaffinity_np(pthread_self(), sizeof set, &set);
  }
  char name[16];
  std::snprintf(name, sizeof name, "shard-%u", index_);
  pthread_setname_np(pthread_self(), name);
  epoll_event events[256];
  std::int64_t last_tick = mono_ns();
  std::int64_t last_event = 0;
  batch_wall_ms_ = static_cast<std::int64_t>(wall_ms());
  cache_start(last_tick);
  // The first batch's idle time is measured from here, not from the clock's epoch.
  batch_ns_ = last_tick;
  const std::int64_t idle_poll_ns = std::int64_t{engine_.options().idle_poll_us} * 1000;
  // Polling pays on a busy shard only: there it saves the wakeup every new packet would cost
  // both sides. A shard idle for much of its time has the CPU to pay for wakeups, and
  // polling would keep that CPU from ever halting: wasted on a shared core, and on a virtual
  // machine a vCPU that never halts is the one its host preempts for milliseconds. So a
  // shard polls only while it waited for under a quarter of the last tick.
  bool polling = idle_poll_ns > 0;
  stats_.counts[kPolling].set(polling ? 1 : 0);
  std::int64_t waited_in_tick = 0;
  std::int64_t loop_end = last_tick;
  while (!engine_.stopping()) {
    // Sleeping costs both sides: the client's next packet must wake this thread (an IPI and
    // a context switch). Right after work, poll instead, for at most idle_poll_ns.
    const bool poll = polling && batch_ns_ - last_event < idle_poll_ns;
    // A request parked for the cache is woken within a millisecond of its wait running out.
    int n = epoll_wait(epoll_fd_, events, 256, poll ? 0 : waiting_.empty() ? 100 : 1);
    // One clock read per batch for wall time: decisions and records need seconds and
    // milliseconds, and a batch takes well under a millisecond.
    const std::int64_t previous_ns = batch_ns_;
    batch_ns_ = mono_ns();
    waited_in_tick += batch_ns_ - loop_end;
    // An empty poll is CPU spent waiting: counted, so the work's own cost can be told apart.
    if (poll && n == 0) stats_.counts[kIdlePollNs].add(static_cast<std::uint64_t>(batch_ns_ - previous_ns));
    batch_wall_ms_ = static_cast<std::int64_t>(wall_ms());
    if (n > 0) last_event = batch_ns_;
    // Publish the generation this batch starts from: every request in it takes the current
    // snapshot, never an older one, and between batches the shard holds none. The admin
    // thread frees a retired snapshot once every shard has published a generation past it.
    stats_.seen_generation.store(engine_.generation(), std::memory_order_release);
    for (int i = 0; i < n; ++i) {
      int fd = events[i].data.fd;
      if (cache_ && fd == cache_->fd()) {
        cache_->on_event(events[i].events, batch_ns_, epoll_fd_);
        continue;
      }
      if (is_listener(fd)) {
        accept_all(fd);
        continue;
      }
      if (fd < 0 || static_cast<std::size_t>(fd) >= conns_.size() || !conns_[fd] || conns_[fd]->closed)
        continue;
      Conn& c = *conns_[fd];
      if (events[i].events & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR))
        on_readable(c, (events[i].events & (EPOLLRDHUP | EPOLLHUP | EPOLLERR)) != 0);
      // Writable again: its pending output goes out with the batch, after the spool write
      // (never before: an answer must not leave ahead of its event record).
      if (!c.closed && (events[i].events & EPOLLOUT) && c.out.size() > c.out_off) mark_dirty(c);
    }
    if (!waiting_.empty()) wake_waiting(batch_ns_);
    // Spool, then answers. A connection held back by a full output buffer gets its waiting
    // requests processed once it drains, which queues more answers: repeat until none.
    while (!dirty_.empty()) {
      const bool recorded = flush_spool(batch_wall_ms_ / 1000);
      // The batch's cache writes (a user's counters) leave before its answers: the user's
      // next request, on any shard, finds them.
      if (cache_) cache_->flush(epoll_fd_);
      sending_.swap(dirty_);
      for (int fd : sending_) {
        Conn& c = *conns_[static_cast<std::size_t>(fd)];
        c.dirty = false;
        if (c.closed) continue;
        if (!recorded) {
          // The batch's records are not on disk: none of its answers may say otherwise.
          close_conn(c);
          continue;
        }
        flush(c);
        if (c.closed || c.out.size() - c.out_off >= kMaxOutput / 2) continue;
        if (!c.in.empty()) process(c);
        if (!c.closed && c.read_pending) on_readable(c, false);
      }
      sending_.clear();
    }
    loop_end = mono_ns();
    if (loop_end - last_tick > 100'000'000) {
      polling = idle_poll_ns > 0 && waited_in_tick * 4 < loop_end - last_tick;
      stats_.counts[kPolling].set(polling ? 1 : 0);
      waited_in_tick = 0;
      tick(loop_end);
      last_tick = loop_end;
    }
  }
}

bool Shard::is_listener(int fd) const {
  if (fd == metrics_fd_) return true;
  for (int l : listen_fds_)
    if (fd == l) return true;
  return false;
}

// At the cap, idle connections (nothing pending either way) are closed oldest first, a
// sixteenth of the cap in one pass, so that sockets held open doing nothing can never lock
// clients out, and a flood of new connections does not pay a scan each. False when none is
// idle: then the cap holds.
bool Shard::evict_idle() {
  std::vector<std::pair<std::int64_t, int>> idle;
  for (auto& p : conns_)
    if (p && !p->closed && p->in.empty() && p->out.size() == p->out_off)
      idle.emplace_back(p->last_active_ns, p->fd);
  if (idle.empty()) return false;
  const std::size_t batch = std::min<std::size_t>(idle.size(), std::max<std::uint32_t>(1, cap_ / 16));
  std::nth_element(idle.begin(), idle.begin() + static_cast<std::ptrdiff_t>(batch - 1), idle.end());
  for (std::size_t i = 0; i < batch; ++i) {
    stats_.errors[kErrIdleEvicted].add();
    close_conn(*conns_[static_cast<std::size_t>(idle[i].second)]);
  }
  return true;
}

void Shard::accept_all(int listen_fd) {
  while (true) {
    int fd = accept4(listen_fd, nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (fd < 0) return;  // EAGAIN, or an error the next readiness will repeat
    if (open_ >= cap_ && !evict_idle()) {
      // Over the cap with every connection busy: refuse at once rather than queue work this
      // shard cannot do.
      stats_.errors[kErrConnectionCap].add();
      ::close(fd);
      continue;
    }
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (static_cast<std::size_t>(fd) >= conns_.size()) conns_.resize(static_cast<std::size_t>(fd) + 64);
    if (!conns_[fd]) conns_[fd] = std::make_unique<Conn>();
    Conn& c = *conns_[fd];
    c.fd = fd;
    c.in.clear();
    c.out.clear();
    c.out_off = 0;
    c.close_after = false;
    c.closed = false;
    c.metrics_only = listen_fd == metrics_fd_;
    c.sent_any = false;
    c.last_active_ns = mono_ns();
    c.request_start_ns = 0;
    c.accepted_draining = engine_.draining();
    c.read_pending = false;
    c.dirty = false;
    epoll_event ev{};
    ev.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET;
    ev.data.fd = fd;
    epoll_ctl(epoll_fd_, EPOLL_CTL_ADD, fd, &ev);
    ++open_;
    stats_.counts[kConnectionsTotal].add();
    stats_.counts[kConnectionsOpen].set(open_);
  }
}

void Shard::close_conn(Conn& c) {
  if (c.closed) return;
  epoll_ctl(epoll_fd_, EPOLL_CTL_DEL, c.fd, nullptr);
  ::close(c.fd);
  c.closed = true;
  c.in.clear();
  c.in.shrink_to_fit();
  c.out.clear();
  c.out.shrink_to_fit();
  --open_;
  stats_.counts[kConnectionsOpen].set(open_);
}

void Shard::on_readable(Conn& c, bool hangup) {
  char buf[16384];
  bool eof = false;
  c.read_pending = false;
  while (true) {
    // A client that sends but never reads is not read from until its answers drain. Edge
    // triggering will not report the bytes left in the socket again, so the connection is
    // marked to be read on once its output drains (see run()).
    if (c.out.size() - c.out_off > kMaxOutput) {
      c.read_pending = true;
      break;
    }
    ssize_t n = recv_raw(c.fd, buf, sizeof buf);
    if (n > 0) {
      c.sent_any = true;
      if (c.in.empty()) c.request_start_ns = batch_ns_;
      c.in.append(buf, static_cast<std::size_t>(n));
      c.last_active_ns = batch_ns_;
      // Bound the buffer: a head or body over the limits is refused by the parser long
      // before this, so only pipelined floods get here; process what we have first.
      if (c.in.size() >
          engine_.options().http.max_header_bytes + engine_.options().http.max_body_bytes + 16384) {
        process(c);
        if (c.closed) return;
        if (c.in.size() >
            engine_.options().http.max_header_bytes + engine_.options().http.max_body_bytes + 16384) {
          c.read_pending = true;
          break;
        }
      }
      // A short read drained the socket: with edge triggering, new data raises a new event,
      // so the read that would only say EAGAIN is skipped. After a hangup, read on to EOF.
      if (static_cast<std::size_t>(n) < sizeof buf && !hangup) break;
      continue;
    }
    if (n == 0) {
      eof = true;
      break;
    }
    if (errno == EINTR) continue;
    if (errno == EAGAIN || errno == EWOULDBLOCK) break;
    close_conn(c);
    return;
  }
  process(c);
  // The client finished sending: answer what was complete (at the end of this batch), then
  // close.
  if (eof && !c.closed) {
    c.close_after = true;
    mark_dirty(c);
  }
}

void Shard::respond_error(Conn& c, int code, ErrorReason reason) {
  stats_.errors[reason].add();
  char body[128];
  int n = std::snprintf(body, sizeof body, "{\"error\":\"%s\"}", error_reason_name(reason));
  append_response(c.out, code, "application/json", std::string_view(body, static_cast<std::size_t>(n)), true);
  c.close_after = true;
  c.in.clear();
}

void Shard::mark_dirty(Conn& c) {
  if (c.dirty) return;
  c.dirty = true;
  dirty_.push_back(c.fd);
}

void Shard::process(Conn& c) {
  const std::size_t out_before = c.out.size();
  std::size_t offset = 0;
  const http::Limits& limits = engine_.options().http;
  while (!c.close_after && !c.waiting && offset < c.in.size() && c.out.size() - c.out_off <= kMaxOutput) {
    http::Request req;
    std::string_view view(c.in.data() + offset, c.in.size() - offset);
    http::Result r = http::parse(view, limits, req);
    if (r.status == http::Status::kIncomplete) break;
    if (r.status == http::Status::kError) {
      offset = 0;
      respond_error(c, r.code, reason_from_parser(r.reason));
      break;
    }
    std::uint64_t generation = 0;
    const Snapshot* snap = engine_.acquire(&generation);
    handle(c, req, snap);
    if (c.waiting) break;  // parked for the cache: read again from the buffer on waking
    // Latency from the event batch that delivered the request: it includes the wait behind
    // the batch's earlier requests, as the client sees it, and costs one clock read.
    stats_.latency.record(static_cast<std::uint64_t>(mono_ns() - batch_ns_));
    offset += req.consumed;
    if (!req.keep_alive) c.close_after = true;
  }
  if (offset > 0 && !c.close_after)
    c.in.erase(0, offset);
  else if (c.close_after)
    c.in.clear();
  c.request_start_ns = c.in.empty() ? 0 : (c.request_start_ns ? c.request_start_ns : mono_ns());
  // Answers go out at the end of the event batch, after one spool write for the whole batch:
  // records reach the file before the answers that caused them reach the client.
  if (c.out.size() != out_before || c.close_after) mark_dirty(c);
}

void Shard::flush(Conn& c) {
  while (c.out_off < c.out.size()) {
    ssize_t n = send_raw(c.fd, c.out.data() + c.out_off, c.out.size() - c.out_off);
    if (n > 0) {
      c.out_off += static_cast<std::size_t>(n);
      continue;
    }
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return;
    close_conn(c);
    return;
  }
  c.out.clear();
  c.out_off = 0;
  if (c.close_after) close_conn(c);
}

void Shard::tick(std::int64_t now) {
  const EngineOptions& o = engine_.options();
  pacer_.tick(static_cast<std::int64_t>(wall_ms()));
  cache_tick(now);
  flush_spool(engine_.now_seconds());  // rotates an idle shard's segment by age
  // A shedding shard looks again each tick, so it reports room as soon as shipping made it.
  if (stats_.counts[kSpoolShedding].get()) may_record(kDecisionRecordBytes, true);
  const std::int64_t idle = std::int64_t{o.idle_timeout_ms} * 1'000'000;
  const std::int64_t slow = std::int64_t{o.request_timeout_ms} * 1'000'000;
  const std::int64_t silent = std::int64_t{o.first_byte_timeout_ms} * 1'000'000;
  for (auto& p : conns_) {
    if (!p || p->closed) continue;
    Conn& c = *p;
    if (!c.sent_any && now - c.last_active_ns > silent) {
      // Connected and never spoke: a client has its request ready when it connects, so
      // this one is holding a slot, not asking (the idle timeout is for keep-alive).
      stats_.errors[kErrFirstByteTimeout].add();
      close_conn(c);
    } else if (c.request_start_ns && now - c.request_start_ns > slow) {
      // Slowloris: the request did not complete in time. Answer 408 and hang up.
      respond_error(c, 408, kErrTimeout);
      c.request_start_ns = 0;
      flush(c);
      if (!c.closed) close_conn(c);
    } else if (c.in.empty() && c.out.size() == c.out_off && now - c.last_active_ns > idle) {
      close_conn(c);
    } else if (engine_.draining() && c.in.empty() && c.out.size() == c.out_off &&
               now - c.last_active_ns > 1'000'000'000) {
      // Draining: idle keep-alive connections are closed so clients move elsewhere. A second
      // of grace: a connection just opened (a balancer's health check) gets to send first.
      close_conn(c);
    }
  }
}

}  // namespace adpop
