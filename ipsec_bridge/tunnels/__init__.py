"""The tunnels of one node, one room per job; `manager.TunnelManager` owns and wires them.

- `desired` (pure): the NodeView (WDS workloads, policies, local pods, VF map) -> the tunnels this node should have.
- `manager`: reconcile - tunnels no longer admitted go at once (policies first, so their traffic hits the block,
  then every SA); new ones get a record. Owns the rooms' lifetimes in one TaskGroup.
- `scheduler`: when each tunnel is set up, retried (backoff), rekeyed (interval, soft EXPIRE, certificate renewal,
  on demand), when retired generations are deleted after the grace period, and when SAs whose certificates
  expired go.
- `initiator` / `responder`: the two roles of a handshake (and of a rekey request). A responder never starts a
  handshake: when it wants a rekey (its own soft EXPIRE, renewal, restart, an operator) it asks the initiator, so
  the two sides never race to replace a generation.
- `generations`: what both roles share - the handshake's plan, the SAs and pair policies, the commit.
- `adoption`: restart (the kernel side is planned by ipsec_bridge.adopt). Tunnels a previous run left in the
  kernel stay untouched until the workload state is synced; then each one the policies still admit becomes a
  record whose current generation is the adopted one, rekeyed at once (make-before-break, the adopted SAs retire
  after the grace period), and the others are removed. Until that decision, handshakes are answered not-ready.
- `view` (pure): the admin endpoint's rows and counts.
- `table`: the records every room shares and the one way a tunnel leaves them; `records`: the records themselves.

Time: one monotonic clock (`Callable[[], float]`, default time.monotonic) and one wall clock are injected into
TunnelManager and handed to every room; nothing here reads time.monotonic() itself.
"""
