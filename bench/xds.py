"""ADS at scale: N simulated ztunnel Delta clients against ztd's xDS over a synthetic W-workload registry.

Two processes on one machine: the server (`--serve`: the real Publisher, engine, AdsSource and ADS servicer
on a plaintext gRPC port, exactly as ztd wires them, minus the CA) and the clients (this process: N grpc.aio
Delta streams, one channel each, like N ztunnels). Separate processes so that the server's RSS is its own
and the two sides do not share one GIL.

Measured:
- initial sync: from the first connect until every client has received (and ACKed) Address and
  Authorization; per-client time to sync;
- convergence after one change (a pod relabelled through the registry): for each client, the time from the
  push (the cache updated) until that client received the change and sent its ACK; p50/p99/max over
  clients and changes. Also the time from the registry change to the push (debounce + translation);
- server RSS (VmRSS, and VmHWM = peak) after the initial sync and after the changes.

Clients decode only what they need to ACK (type, nonce, the resource entries as raw bytes: counted, not
unpacked); with --verify-every K, every K-th client fully decodes its first Address response and checks it
against the server's resource count.

    .venv/bin/python bench/xds.py                        # 1,000 clients x 10,000 workloads
    .venv/bin/python bench/xds.py --clients 100 --workloads 1000
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import hashlib
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# This file is named xds.py: run as a script, its folder would shadow xds-protos' top-level `xds` package.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402
from envoy.config.core.v3 import base_pb2  # noqa: E402
from envoy.service.discovery.v3 import discovery_pb2  # noqa: E402
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, struct_pb2  # noqa: E402

from ztcore.xds import typeurls  # noqa: E402

ADDRESS, AUTHORIZATION = typeurls.ADDRESS, typeurls.AUTHORIZATION
ADS = "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources"


# -- the synthetic mesh -------------------------------------------------------------------------------------


def synthetic_yaml(workloads: int, services_per_ns: int = 10, pods_per_ns: int = 100, nodes: int = 100) -> str:
    """W pods in W/100 ambient namespaces, 10 services and 2 policies per namespace, 100 nodes."""
    namespaces = max(1, workloads // pods_per_ns)
    docs: list[str] = [f"apiVersion: v1\nkind: Node\nmetadata: {{name: node-{n}}}\n" for n in range(nodes)]
    for ns in range(namespaces):
        name = f"ns-{ns}"
        docs.append(
            f"apiVersion: v1\nkind: Namespace\n"
            f"metadata: {{name: {name}, labels: {{istio.io/dataplane-mode: ambient}}}}\n"
        )
        for s in range(services_per_ns):
            ip = f"10.{96 + s}.{ns // 256}.{ns % 256}"
            docs.append(
                f"apiVersion: v1\nkind: Service\nmetadata: {{name: svc-{s}, namespace: {name}}}\n"
                f"spec: {{clusterIP: {ip}, selector: {{app: app-{s}}}, "
                f"ports: [{{name: http, port: 80, targetPort: 8080}}]}}\n"
            )
        docs.append(
            f"apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"
            f"metadata: {{name: allow-app-0, namespace: {name}}}\n"
            f"spec: {{selector: {{matchLabels: {{app: app-0}}}}, action: ALLOW, rules: [{{from: [{{source: "
            f"{{principals: [cluster.local/ns/{name}/sa/sa-1]}}}}], to: [{{operation: {{ports: ['8080']}}}}]}}]}}\n"
        )
        docs.append(
            f"apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"
            f"metadata: {{name: deny-other, namespace: {name}}}\n"
            f"spec: {{action: DENY, rules: [{{from: [{{source: {{notNamespaces: [{name}, istio-system]}}}}]}}]}}\n"
        )
    for i in range(workloads):
        app = i % services_per_ns
        ip = f"10.{128 + (i >> 16)}.{(i >> 8) & 255}.{i & 255}"
        docs.append(
            f"apiVersion: v1\nkind: Pod\n"
            f"metadata: {{name: pod-{i}, namespace: ns-{i % namespaces}, labels: {{app: app-{app}, version: v1}}}}\n"
            f"spec: {{serviceAccountName: sa-{app}, nodeName: node-{i % nodes}, "
            f"containers: [{{name: app, ports: [{{name: http, containerPort: 8080}}]}}]}}\n"
            f"status: {{podIP: {ip}}}\n"
        )
    return "---\n".join(docs)


def synthetic_objects(workloads: int) -> list[Any]:
    """The synthetic mesh parsed by ztd's own parser (cached in the temp folder: parsing 10,000 pods is slow)."""
    import pickle
    import tempfile

    from ztcore.mesh.registry.parse import parse_text

    cache = Path(tempfile.gettempdir()) / f"ztdpu-bench-xds-{workloads}.pickle"
    source = synthetic_yaml(workloads)
    key = hashlib.sha256(source.encode()).hexdigest()
    with contextlib.suppress(OSError, EOFError, pickle.UnpicklingError):
        cached_key, objects = pickle.loads(cache.read_bytes())  # noqa: S301 - our own file, written below
        if cached_key == key:
            return list(objects)
    parsed = parse_text(source, "synthetic.yaml")
    assert not parsed.errors, parsed.errors[:3]
    objects = list(parsed.objects)
    cache.write_bytes(pickle.dumps((key, objects)))
    return objects


# -- the server process -------------------------------------------------------------------------------------------


def _rss() -> tuple[int, int]:
    status = Path("/proc/self/status").read_text()
    values = {line.split(":")[0]: int(line.split()[1]) for line in status.splitlines() if line.startswith("Vm")}
    return values.get("VmRSS", 0), values.get("VmHWM", 0)


async def serve(workloads: int, port: int) -> None:
    import dataclasses

    from xds_server.build import no_resources
    from xds_server.debug import DebugService
    from xds_server.main import freeze_heap
    from xds_server.publish import Publisher, PushTuning
    from xds_server.server import AdsServicer, AdsSource, add_ads_to_server, control_plane_identifier
    from ztcore.mesh.registry.objects import Pod
    from ztcore.mesh.registry.store import Registry
    from ztcore.mesh.translate import TranslateOptions
    from ztcore.xds.cache import SnapshotCache
    from ztcore.xds.grpc_adapter import XdsStreams

    started = time.perf_counter()
    objects = synthetic_objects(workloads)
    registry = Registry(objects)
    cache = SnapshotCache()
    publisher = Publisher(registry, cache, options=TranslateOptions(), tuning=PushTuning(0.1, 10.0))
    t0 = time.perf_counter()
    await publisher.publish(registry.current)
    say(
        "published",
        f"{time.perf_counter() - t0:.3f}",
        len(cache.resources(ADDRESS)),
        len(cache.resources(AUTHORIZATION)),
    )

    async def on_push(_: Any) -> None:
        say("pushed", f"{time.time():.6f}", cache.revision, f"{time.process_time():.6f}")
        if os.environ.get("BENCH_GC") != "off":
            await freeze_heap(None)  # what ztd does after every push (xds_server/main.py)

    if os.environ.get("BENCH_GC") != "off":
        gc.collect()  # the mesh was just built: nothing of it is garbage
        gc.freeze()

    publisher.add_listener(on_push)
    source = AdsSource(cache, publisher, no_resources)
    streams = XdsStreams(cache, source, control_plane=control_plane_identifier("bench", "0"), encoded_delta=True)
    debug = DebugService(streams, source, cache, cluster_id="Kubernetes", control_plane="")
    servicer = AdsServicer(
        streams,
        source,
        debug,
        tls_peers=None,
        throttle=asyncio.Semaphore(
            int(os.environ.get("PILOT_PUSH_THROTTLE", min(15 + 5 * (os.cpu_count() or 1), 100)))
        ),
    )
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", 64 * 1024 * 1024)])
    add_ads_to_server(servicer, server)
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    runner = asyncio.create_task(publisher.run())
    say("ready", bound, f"{time.perf_counter() - started:.3f}", *_rss())

    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    pods = [i for i, o in enumerate(objects) if isinstance(o, Pod)]
    generation = 0
    profiler = None
    # BENCH_PROFILE=initial|change: cProfile the initial sync (until `synced`) or the changes (until `rss`).
    if os.environ.get("BENCH_PROFILE") == "initial":
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    while line := (await reader.readline()).decode().strip():
        cmd = line.split()
        if cmd[0] == "change" and os.environ.get("BENCH_PROFILE") == "change" and profiler is None:
            import cProfile

            profiler = cProfile.Profile()
            profiler.enable()
        if cmd[0] in ("rss", "synced") and profiler is not None:
            import pstats

            profiler.disable()
            pstats.Stats(profiler, stream=sys.stderr).sort_stats("cumulative").print_stats(45)
            profiler = None
        if cmd[0] == "change":
            generation += 1
            index = pods[int(cmd[1]) % len(pods)]
            pod = objects[index]
            assert isinstance(pod, Pod)
            labels = dict(pod.meta.labels.items())
            labels["version"] = f"v{generation + 1}"
            meta = dataclasses.replace(pod.meta, labels=type(pod.meta.labels)(sorted(labels.items())))
            objects[index] = dataclasses.replace(pod, meta=meta)
            t, cpu = time.time(), time.process_time()
            registry.apply([objects[index]])  # what ztd's folder and Kubernetes sources do with one changed object
            say("changed", f"{t:.6f}", f"{time.time() - t:.3f}", f"{cpu:.6f}")
        elif cmd[0] == "rss":
            say("rss", *_rss())
        elif cmd[0] == "cpu":
            say("cpu", f"{time.process_time():.6f}")
        elif cmd[0] == "synced":
            count = 0
            for info in streams.streams():
                statuses = info.statuses()
                if all(t in statuses and statuses[t].status == "SYNCED" for t in (ADDRESS, AUTHORIZATION)):
                    count += 1
            say("synced", count, len(streams.streams()))
    runner.cancel()
    await server.stop(1)


def say(*words: object) -> None:
    """A line to the bench process (the servers' stdout is its pipe)."""
    print(*words, flush=True)


# -- the floor: a bare grpc.aio fan-out of the same bytes ------------------------------------------------------------

FLOOR = "/bench.Floor/Stream"


async def serve_floor() -> None:
    """A grpc.aio server that does nothing but write N bytes to every open stream on `push` and read the replies:
    what any Python gRPC control plane pays per client per push, whatever it computes."""
    streams: list[asyncio.Queue[bytes | None]] = []

    async def stream(request_iterator: Any, context: Any) -> Any:
        queue: asyncio.Queue[bytes | None] = asyncio.Queue()
        streams.append(queue)

        async def drain() -> None:
            async for _ in request_iterator:
                pass
            queue.put_nowait(None)

        reader = asyncio.create_task(drain())
        try:
            while (item := await queue.get()) is not None:
                yield item
        finally:
            reader.cancel()
            streams.remove(queue)

    identity = lambda b: b  # noqa: E731 - bytes in, bytes out
    handler = grpc.method_handlers_generic_handler(
        "bench.Floor", {"Stream": grpc.stream_stream_rpc_method_handler(stream, identity, identity)}
    )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    bound = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    say("ready", bound)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := (await reader.readline()).decode().strip():
        cmd = line.split()
        if cmd[0] == "push":
            payload = b"x" * int(cmd[1])
            t, cpu = time.time(), time.process_time()
            for queue in streams:
                queue.put_nowait(payload)
            say("pushed", f"{t:.6f}", len(streams), f"{cpu:.6f}")
        elif cmd[0] == "cpu":
            say("cpu", f"{time.process_time():.6f}")
    await server.stop(1)


async def floor(clients: int, size: int, rounds: int) -> dict[str, Any]:
    """N clients on their own channels, a `size`-byte push to all, each replies; as the xDS measurement."""
    server = Server(0, "--serve-floor")
    await server.start()
    replies: list[list[float]] = [[] for _ in range(clients)]
    calls: list[Any] = []
    try:
        port = int((await server.expect("ready"))[1])

        async def client(i: int) -> None:
            queue: asyncio.Queue[bytes] = asyncio.Queue()
            queue.put_nowait(b"hello")

            async def requests() -> Any:
                while True:
                    yield await queue.get()

            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                call = channel.stream_stream(FLOOR)(requests())
                calls.append(call)
                with contextlib.suppress(grpc.aio.AioRpcError, asyncio.CancelledError):
                    async for _ in call:
                        queue.put_nowait(b"ack-0123456789")  # about an ACK's size
                        replies[i].append(time.time())

        tasks = [asyncio.create_task(client(i)) for i in range(clients)]
        await asyncio.sleep(2.0 + clients / 500)  # every stream open
        latencies: list[float] = []
        cpu: list[float] = []
        for _ in range(rounds):
            before = [len(r) for r in replies]
            server.send(f"push {size}")
            pushed_line = await server.expect("pushed")
            pushed, cpu_at_push = float(pushed_line[1]), float(pushed_line[3])
            deadline = time.time() + 60
            while any(len(r) <= b for r, b in zip(replies, before, strict=True)) and time.time() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.3)
            server.send("cpu")
            cpu.append(float((await server.expect("cpu"))[1]) - cpu_at_push)
            latencies += [r[b] - pushed for r, b in zip(replies, before, strict=True) if len(r) > b]
            await asyncio.sleep(0.2)
        for call in calls:
            call.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return {
            "floor_message_bytes": size,
            "floor_push_to_reply_p50_ms": round(pct(latencies, 50) * 1000, 1),
            "floor_push_to_reply_p99_ms": round(pct(latencies, 99) * 1000, 1),
            "floor_server_cpu_per_push_ms": round(statistics.median(cpu) * 1000, 1),
        }
    finally:
        server.close()


# -- the client side ----------------------------------------------------------------------------------------------


def lite_response_class() -> Any:
    """DeltaDiscoveryResponse with `resources` as raw bytes: the fields a client needs to ACK, decoded cheaply."""
    fdp = descriptor_pb2.FileDescriptorProto(name="bench_lite.proto", package="bench", syntax="proto3")
    msg = fdp.message_type.add(name="LiteDelta")
    label, opt, rep = descriptor_pb2.FieldDescriptorProto, 1, 3
    for name, number, kind, lab in (
        ("system_version_info", 1, label.TYPE_STRING, opt),
        ("resources", 2, label.TYPE_BYTES, rep),
        ("type_url", 4, label.TYPE_STRING, opt),
        ("nonce", 5, label.TYPE_STRING, opt),
        ("removed_resources", 6, label.TYPE_STRING, rep),
    ):
        msg.field.add(name=name, number=number, type=kind, label=lab)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("bench.LiteDelta"))


@dataclass
class Client:
    index: int
    verify: bool
    connected_at: float = 0.0
    synced_at: float = 0.0
    counts: dict[str, int] = field(default_factory=dict)
    # time.time() of each Address response after the initial one (with its ACK sent), and its size
    updates: list[float] = field(default_factory=list)
    update_bytes: list[int] = field(default_factory=list)
    verified: int | None = None
    error: str = ""


def node_for(i: int) -> base_pb2.Node:
    meta = struct_pb2.Struct()
    meta.update({"NAME": f"ztunnel-{i}", "NAMESPACE": "istio-system", "INSTANCE_IPS": f"10.250.{i // 256}.{i % 256}",
                 "NODE_NAME": f"node-{i % 100}", "CLUSTER_ID": "Kubernetes", "ISTIO_VERSION": "1.28.0"})  # fmt: skip
    ident = f"ztunnel-{i}.istio-system"
    return base_pb2.Node(
        id=f"ztunnel~10.250.{i // 256}.{i % 256}~{ident}~istio-system.svc.cluster.local", metadata=meta
    )


async def run_client(
    client: Client, port: int, lite: Any, synced: asyncio.Event, total: list[int], calls: list[Any]
) -> None:
    queue: asyncio.Queue[Any] = asyncio.Queue()
    first = discovery_pb2.DeltaDiscoveryRequest(type_url=ADDRESS, node=node_for(client.index))
    queue.put_nowait(first)
    queue.put_nowait(discovery_pb2.DeltaDiscoveryRequest(type_url=AUTHORIZATION))

    async def requests() -> Any:
        while True:
            item = await queue.get()
            if item is None:
                return
            yield item

    def counted() -> None:
        total[0] += 1
        if total[0] == total[1]:
            synced.set()

    options = [("grpc.max_receive_message_length", 200 * 1024 * 1024)]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
        method = channel.stream_stream(
            ADS,
            request_serializer=discovery_pb2.DeltaDiscoveryRequest.SerializeToString,
            response_deserializer=lite.FromString,
        )
        client.connected_at = time.time()
        call = method(requests())
        calls.append(call)
        try:
            async for resp in call:
                queue.put_nowait(discovery_pb2.DeltaDiscoveryRequest(type_url=resp.type_url, response_nonce=resp.nonce))
                now = time.time()
                if resp.type_url not in client.counts:
                    client.counts[resp.type_url] = len(resp.resources)
                    if client.verify and resp.type_url == ADDRESS:
                        full = discovery_pb2.DeltaDiscoveryResponse.FromString(resp.SerializeToString())
                        client.verified = len(full.resources)
                    if len(client.counts) == 2:
                        client.synced_at = now
                        counted()
                elif resp.type_url == ADDRESS:
                    client.updates.append(now)
                    if client.index == 0:
                        client.update_bytes.append(resp.ByteSize())
        except grpc.aio.AioRpcError as err:
            if err.code() != grpc.StatusCode.CANCELLED:
                client.error = f"{err.code().name}: {err.details()}"
                counted()
        except asyncio.CancelledError:
            pass
        finally:
            queue.put_nowait(None)


class Server:
    def __init__(self, workloads: int, mode: str = "--serve") -> None:
        self.proc = subprocess.Popen(
            [sys.executable, __file__, mode, "--workloads", str(workloads)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        self.lines: asyncio.Queue[list[str]] = asyncio.Queue()

    async def start(self) -> None:
        assert self.proc.stdout is not None
        loop = asyncio.get_running_loop()

        def pump() -> None:
            assert self.proc.stdout is not None
            for line in self.proc.stdout:
                loop.call_soon_threadsafe(self.lines.put_nowait, line.split())

        loop.run_in_executor(None, pump)

    async def expect(self, word: str, within: float = 600) -> list[str]:
        async with asyncio.timeout(within):
            while True:
                words = await self.lines.get()
                if words and words[0] == word:
                    return words

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            assert self.proc.stdin is not None
            self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(p / 100 * len(ordered)) - 1))]


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    # The simulated clients are the measuring instrument: keep the collector's pauses out of their timings.
    gc.disable()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, 4 * args.clients + 256)), hard))
    server = Server(args.workloads)
    await server.start()
    result: dict[str, Any] = {"clients": args.clients, "workloads": args.workloads}
    try:
        published = await server.expect("published")
        result["server_publish_seconds"] = float(published[1])
        result["address_resources"], result["authorization_resources"] = int(published[2]), int(published[3])
        ready = await server.expect("ready")
        port = int(ready[1])
        result["server_startup_seconds"] = float(ready[2])
        result["server_rss_idle_mib"] = int(ready[3]) / 1024
        lite = lite_response_class()
        clients = [Client(i, args.verify_every > 0 and i % args.verify_every == 0) for i in range(args.clients)]
        synced = asyncio.Event()
        calls: list[Any] = []
        total = [0, len(clients)]
        start = time.time()
        tasks = [asyncio.create_task(run_client(c, port, lite, synced, total, calls)) for c in clients]
        await asyncio.wait_for(synced.wait(), args.sync_timeout)
        done_at = max(c.synced_at for c in clients)
        errors = [c.error for c in clients if c.error]
        result["errors"] = errors[:5]
        result["initial_sync_all_seconds"] = round(done_at - start, 3)
        per_client = [c.synced_at - c.connected_at for c in clients if c.synced_at]
        result["initial_sync_per_client_p50_seconds"] = round(pct(per_client, 50), 3)
        result["initial_sync_per_client_p99_seconds"] = round(pct(per_client, 99), 3)
        counts = {c.counts.get(ADDRESS) for c in clients}
        result["address_counts_seen"] = sorted(x for x in counts if x is not None)
        verified = [c.verified for c in clients if c.verified is not None]
        result["verified_clients"] = len(verified)
        assert all(v == result["address_resources"] for v in verified), verified
        await asyncio.sleep(1.0)
        server.send("synced")
        result["server_synced_streams"] = int((await server.expect("synced"))[1])
        server.send("rss")
        rss = await server.expect("rss")
        result["server_rss_after_sync_mib"], result["server_rss_peak_mib"] = int(rss[1]) / 1024, int(rss[2]) / 1024

        push_to_ack: list[float] = []
        change_to_ack: list[float] = []
        change_to_push: list[float] = []
        server_cpu: list[float] = []
        client_cpu: list[float] = []
        for n in range(args.changes):
            before = [len(c.updates) for c in clients]
            server.send(f"change {n * 7919}")
            changed_line = await server.expect("changed")
            changed, cpu_at_change = float(changed_line[1]), float(changed_line[3])
            pushed_line = await server.expect("pushed")
            pushed = float(pushed_line[1])
            ours = time.process_time()
            change_to_push.append(pushed - changed)
            deadline = time.time() + 60
            # Polling is the simplest way to watch 1,000 clients at once; 10 ms does not skew the per-client times.
            while any(len(c.updates) <= b for c, b in zip(clients, before, strict=True)) and time.time() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
            client_cpu.append(time.process_time() - ours)
            await asyncio.sleep(0.3)  # the last ACKs reach the server
            server.send("cpu")
            server_cpu.append(float((await server.expect("cpu"))[1]) - cpu_at_change)
            for c, b in zip(clients, before, strict=True):
                if len(c.updates) > b:
                    push_to_ack.append(c.updates[b] - pushed)
                    change_to_ack.append(c.updates[b] - changed)
            await asyncio.sleep(0.2)
        if push_to_ack:
            result["convergence_push_to_ack_p50_ms"] = round(pct(push_to_ack, 50) * 1000, 1)
            result["convergence_push_to_ack_p99_ms"] = round(pct(push_to_ack, 99) * 1000, 1)
            result["convergence_push_to_ack_max_ms"] = round(max(push_to_ack) * 1000, 1)
            result["convergence_samples"] = len(push_to_ack)
            result["change_to_push_mean_ms"] = round(statistics.mean(change_to_push) * 1000, 1)
            result["change_to_ack_p50_ms"] = round(pct(change_to_ack, 50) * 1000, 1)
            result["change_to_ack_p99_ms"] = round(pct(change_to_ack, 99) * 1000, 1)
            result["server_cpu_per_change_ms"] = round(statistics.median(server_cpu) * 1000, 1)
            result["client_cpu_per_push_ms"] = round(statistics.median(client_cpu) * 1000, 1)
        server.send("rss")
        rss = await server.expect("rss")
        result["server_rss_after_changes_mib"], result["server_rss_peak_mib"] = int(rss[1]) / 1024, int(rss[2]) / 1024
        size = clients[0].update_bytes[0] if clients[0].update_bytes else 0
        for call in calls:
            call.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        server.close()
    if args.changes and size:
        result.update(await floor(args.clients, size, args.changes))
        result["server_cpu_per_change_vs_floor"] = round(
            result["server_cpu_per_change_ms"] / max(result["floor_server_cpu_per_push_ms"], 0.1), 2
        )
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--workloads", type=int, default=10000)
    parser.add_argument("--changes", type=int, default=5)
    parser.add_argument("--verify-every", type=int, default=100)
    parser.add_argument("--sync-timeout", type=float, default=600)
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--serve-floor", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_floor:
        asyncio.run(serve_floor())
        return 0
    if args.serve:
        import logging

        logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
        asyncio.run(serve(args.workloads, args.port))
        return 0
    result = asyncio.run(bench(args))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
