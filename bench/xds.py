"""ADS at scale: N simulated ztunnel Delta clients against ztd's xDS over a synthetic W-workload registry.

Two processes on one machine: the server (`--serve`: the real Publisher, engine, AdsSource and ADS servicer
on a plaintext gRPC port, exactly as ztd wires them, minus the CA) and the clients (this process: N grpc.aio
Delta streams, one channel each, like N ztunnels). Separate processes so that the server's RSS is its own
and the two sides do not share one GIL.

Measured:
- initial sync: from the first connect until every client has received (and ACKed) Address and
  Authorization; per-client time to sync;
- convergence after one change (a pod relabelled): for each client, from the change (the registry told, or
  the manifest written) until that client received it and sent its ACK, and from the push (the cache
  updated); p50/p99/max over clients and changes. The change reaches the registry one of two ways
  (`--source`): `direct`, one object applied as a Kubernetes watch event is; `folder`, the namespace's
  manifest rewritten in the folder ztd watches (inotify, only that file re-parsed);
- server CPU per change, beside a floor measured in the same run: a bare grpc.aio server writing the same
  response bytes to as many streams and reading one ACK from each (no xDS logic);
- server RSS (VmRSS, and VmHWM = peak) after the initial sync and after the changes;
- `--soak N`: N mixed changes (pods relabelled, deleted and re-added, services, policies, namespaces leaving
  and rejoining ambient), each received by every client before the next: RSS slope per change after a
  warm-up, latency per window of 100 changes and by kind, server CPU per change.

Clients decode only what they need to ACK (type, nonce, the resource entries as raw bytes: counted, not
unpacked); with --verify-every K, every K-th client fully decodes its first Address response and checks it
against the server's resource count.

    .venv/bin/python bench/xds.py                        # 1,000 clients x 10,000 workloads
    .venv/bin/python bench/xds.py --clients 100 --workloads 1000
    .venv/bin/python bench/xds.py --source folder        # the change as a rewritten manifest
    .venv/bin/python bench/xds.py --clients 100 --soak 1000
Diagnostics: BENCH_GC=off leaves out ztd's gc.freeze() and heap sweep (BENCH_SWEEP_INTERVAL=s varies the sweep);
PILOT_PUSH_THROTTLE=N; BENCH_PROFILE=initial|change cProfiles the server.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
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


@dataclass
class SyntheticMesh:
    """W pods in W/100 ambient namespaces, 10 services and 2 policies per namespace, 100 nodes, as the YAML a
    user would apply (one file per namespace), and the changes a day in a cluster makes to it."""

    workloads: int
    services_per_ns: int = 10
    pods_per_ns: int = 100
    nodes: int = 100
    pod_version: dict[int, int] = field(default_factory=dict)  # pod -> its `version` label (v1 when absent)
    deleted: list[int] = field(default_factory=list)  # pods deleted, oldest first
    selector_shift: dict[tuple[int, int], int] = field(default_factory=dict)  # (ns, svc) -> app it selects
    policy_variant: dict[int, int] = field(default_factory=dict)  # ns -> the service account allow-app-0 allows
    ambient_off: set[int] = field(default_factory=set)  # namespaces taken out of ambient

    # Mixed changes and their weights: most are pods (rollouts relabel, scaling churns), fewer services and
    # policies, and now and then a namespace leaves or rejoins ambient (a mass change of 100 workloads).
    MIX = (("pod-label", 50), ("pod-churn", 20), ("service", 10), ("policy", 15), ("namespace", 5))

    @property
    def namespaces(self) -> int:
        return max(1, self.workloads // self.pods_per_ns)

    def namespace_of(self, pod: int) -> int:
        return pod % self.namespaces

    def node_doc(self, n: int) -> str:
        return f"apiVersion: v1\nkind: Node\nmetadata: {{name: node-{n}}}\n"

    def namespace_doc(self, ns: int) -> str:
        mode = "none" if ns in self.ambient_off else "ambient"
        labels = f"{{istio.io/dataplane-mode: {mode}}}"
        return f"apiVersion: v1\nkind: Namespace\nmetadata: {{name: ns-{ns}, labels: {labels}}}\n"

    def service_doc(self, ns: int, s: int) -> str:
        ip = f"10.{96 + s}.{ns // 256}.{ns % 256}"
        app = self.selector_shift.get((ns, s), s)
        return (
            f"apiVersion: v1\nkind: Service\nmetadata: {{name: svc-{s}, namespace: ns-{ns}}}\n"
            f"spec: {{clusterIP: {ip}, selector: {{app: app-{app}}}, "
            f"ports: [{{name: http, port: 80, targetPort: 8080}}]}}\n"
        )

    def policy_docs(self, ns: int) -> list[str]:
        sa = self.policy_variant.get(ns, 1)
        return [
            f"apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"
            f"metadata: {{name: allow-app-0, namespace: ns-{ns}}}\n"
            f"spec: {{selector: {{matchLabels: {{app: app-0}}}}, action: ALLOW, rules: [{{from: [{{source: "
            f"{{principals: [cluster.local/ns/ns-{ns}/sa/sa-{sa}]}}}}], "
            f"to: [{{operation: {{ports: ['8080']}}}}]}}]}}\n",
            f"apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"
            f"metadata: {{name: deny-other, namespace: ns-{ns}}}\n"
            f"spec: {{action: DENY, rules: [{{from: [{{source: {{notNamespaces: [ns-{ns}, istio-system]}}}}]}}]}}\n",
        ]

    def pod_doc(self, i: int) -> str:
        app = (i // self.namespaces) % self.services_per_ns  # each namespace's pods spread over its apps
        ip = f"10.{128 + (i >> 16)}.{(i >> 8) & 255}.{i & 255}"
        return (
            f"apiVersion: v1\nkind: Pod\nmetadata: {{name: pod-{i}, namespace: ns-{self.namespace_of(i)}, "
            f"labels: {{app: app-{app}, version: v{self.pod_version.get(i, 1)}}}}}\n"
            f"spec: {{serviceAccountName: sa-{app}, nodeName: node-{i % self.nodes}, "
            f"containers: [{{name: app, ports: [{{name: http, containerPort: 8080}}]}}]}}\n"
            f"status: {{podIP: {ip}}}\n"
        )

    def namespace_docs(self, ns: int) -> list[str]:
        gone = set(self.deleted)
        docs = [self.namespace_doc(ns), *(self.service_doc(ns, s) for s in range(self.services_per_ns))]
        docs += self.policy_docs(ns)
        docs += [self.pod_doc(i) for i in range(ns, self.workloads, self.namespaces) if i not in gone]
        return docs

    def files(self) -> dict[str, str]:
        """The mesh as a folder: nodes.yaml and one ns-N.yaml per namespace."""
        out = {"nodes.yaml": "---\n".join(self.node_doc(n) for n in range(self.nodes))}
        for ns in range(self.namespaces):
            out[f"ns-{ns}.yaml"] = "---\n".join(self.namespace_docs(ns))
        return out

    def text(self) -> str:
        return "---\n".join(self.files().values())

    def change(self, kind: str, n: int) -> Mutation:
        """Apply one change of this kind (n picks what it touches) and say what it did, as a watch would."""
        pod = (n * 7919) % self.workloads
        ns = self.namespace_of(pod)
        if kind == "pod-churn" and self.deleted and (n % 2 == 0 or len(self.deleted) > 20):
            back = self.deleted.pop(0)
            return Mutation(kind, self.namespace_of(back), [self.pod_doc(back)])
        if kind == "pod-churn" and pod not in self.deleted:
            self.deleted.append(pod)
            return Mutation(kind, ns, [], [("Pod", f"ns-{ns}", f"pod-{pod}")])
        if kind == "service":
            s = n % self.services_per_ns
            now = self.selector_shift.get((ns, s), s)
            self.selector_shift[(ns, s)] = s if now != s else (s + 1) % self.services_per_ns
            return Mutation(kind, ns, [self.service_doc(ns, s)])
        if kind == "policy":
            self.policy_variant[ns] = 2 if self.policy_variant.get(ns, 1) == 1 else 1
            return Mutation(kind, ns, self.policy_docs(ns)[:1])
        if kind == "namespace":
            self.ambient_off ^= {ns}
            return Mutation(kind, ns, [self.namespace_doc(ns)])
        while pod in self.deleted:  # a relabel (or a churn that found its pod deleted) of a live pod
            pod = (pod + 1) % self.workloads
        self.pod_version[pod] = self.pod_version.get(pod, 1) + 1
        return Mutation("pod-label", self.namespace_of(pod), [self.pod_doc(pod)])

    def mixed_kind(self, n: int) -> str:
        """The n-th change's kind: a fixed, well-spread sequence with the MIX weights."""
        total = sum(w for _, w in self.MIX)
        slot = (n * 37) % total
        for kind, weight in self.MIX:
            if slot < weight:
                return kind
            slot -= weight
        raise AssertionError


@dataclass
class Mutation:
    kind: str
    namespace: int
    upserts: list[str]  # YAML documents of the objects added or changed
    removals: list[tuple[str, str, str]] = field(default_factory=list)  # keys of the objects deleted


def synthetic_yaml(workloads: int) -> str:
    return SyntheticMesh(workloads).text()


# -- the server process -------------------------------------------------------------------------------------------


def _rss() -> tuple[int, int]:
    status = Path("/proc/self/status").read_text()
    values = {line.split(":")[0]: int(line.split()[1]) for line in status.splitlines() if line.startswith("Vm")}
    return values.get("VmRSS", 0), values.get("VmHWM", 0)


async def serve(workloads: int, port: int, source_kind: str) -> None:
    """The server process: `source_kind` "direct" applies each change to the registry as one watch event
    would (ztd's Kubernetes source), "folder" rewrites the namespace's manifest in a folder ztd watches."""
    import shutil
    import tempfile

    from xds_server.debug import DebugService
    from xds_server.envoy_configs import EnvoyConfigs
    from xds_server.main import HEAP_SWEEP_INTERVAL, freeze_heap, sweep_heap
    from xds_server.publish import Publisher, PushTuning
    from xds_server.server import AdsServicer, AdsSource, add_ads_to_server, control_plane_identifier
    from ztcore.envoy import no_resources
    from ztcore.fsutil import write_atomic
    from ztcore.mesh.registry.files import FileRegistrySource
    from ztcore.mesh.registry.parse import parse_text
    from ztcore.mesh.registry.store import Registry
    from ztcore.mesh.translate import TranslateOptions
    from ztcore.xds.cache import SnapshotCache
    from ztcore.xds.grpc_adapter import XdsStreams

    started = time.perf_counter()
    mesh = SyntheticMesh(workloads)
    registry = Registry()
    folder: Path | None = None
    files: FileRegistrySource | None = None
    if source_kind == "folder":
        folder = Path(tempfile.mkdtemp(prefix="ztdpu-bench-xds-"))
        for name, text in mesh.files().items():
            (folder / name).write_text(text)
        files = FileRegistrySource(folder, registry)
        await files.load_initial()
    else:
        parsed = parse_text(mesh.text(), "synthetic.yaml")
        assert not parsed.errors, parsed.errors[:3]
        registry.apply(parsed.objects)
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
    gc_on = os.environ.get("BENCH_GC") != "off"

    async def on_push(_: Any) -> None:
        say("pushed", f"{time.time():.6f}", cache.revision, f"{time.process_time():.6f}")
        if gc_on:
            await freeze_heap(None)  # what ztd does after every push (xds_server/main.py)

    if gc_on:
        gc.collect()  # the mesh was just built: nothing of it is garbage
        gc.freeze()

    publisher.add_listener(on_push)
    source = AdsSource(EnvoyConfigs(cache, publisher, no_resources))
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
    tasks = [asyncio.create_task(publisher.run())]
    if files is not None:
        tasks.append(asyncio.create_task(files.run()))
    if gc_on:  # as ztd: a full sweep over the frozen heap every 10 minutes (BENCH_SWEEP_INTERVAL to vary it)
        tasks.append(
            asyncio.create_task(sweep_heap(float(os.environ.get("BENCH_SWEEP_INTERVAL", HEAP_SWEEP_INTERVAL))))
        )
    say("ready", bound, f"{time.perf_counter() - started:.3f}", *_rss())

    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
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
        if cmd[0] == "change":  # change <kind|mixed> <n>
            n = int(cmd[2])
            kind = mesh.mixed_kind(n) if cmd[1] == "mixed" else cmd[1]
            t, cpu = time.time(), time.process_time()
            done = mesh.change(kind, n)
            if folder is not None:
                text = "---\n".join(mesh.namespace_docs(done.namespace))
                write_atomic(folder / f"ns-{done.namespace}.yaml", text.encode())
            else:
                # What ztd's Kubernetes source does with one watch event: parse the object, apply it.
                event = parse_text("---\n".join(done.upserts), "event.yaml") if done.upserts else None
                registry.apply(event.objects if event is not None else (), done.removals)
            say("changed", f"{t:.6f}", f"{time.time() - t:.3f}", f"{cpu:.6f}", done.kind)
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
    for task in tasks:
        task.cancel()
    await server.stop(1)
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)


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
    # time.time() of each response after the initial ones (with its ACK sent), and its size
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
                else:
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
    def __init__(self, workloads: int, mode: str = "--serve", source: str = "direct") -> None:
        self.proc = subprocess.Popen(
            [sys.executable, __file__, mode, "--workloads", str(workloads), "--source", source],
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
            with contextlib.suppress(RuntimeError):  # the loop may be gone when the server exits at the end
                loop.call_soon_threadsafe(self.lines.put_nowait, ["<exited>"])

        loop.run_in_executor(None, pump)

    async def expect(self, word: str, within: float = 600) -> list[str]:
        async with asyncio.timeout(within):
            while True:
                words = await self.lines.get()
                if words == ["<exited>"]:
                    raise RuntimeError(f"the server process exited (code {self.proc.wait()}) before '{word}'")
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


async def soak(server: Server, clients: list[Client], changes: int) -> dict[str, Any]:
    """`changes` mixed changes, one after another (each pushed and received by every client before the next):
    the server's RSS every 20 changes and its slope after warm-up, latency per window of 100 changes."""
    warmup = max(100, changes // 5)
    window = 100
    rss: list[tuple[int, int]] = []  # (change number, VmRSS KiB)
    latencies: list[list[float]] = []  # per change: each client's change -> received
    by_kind: dict[str, list[float]] = {}
    unpushed: dict[str, int] = {}
    server.send("cpu")
    cpu_start = float((await server.expect("cpu"))[1])
    started = time.time()
    for n in range(changes):
        before = [len(c.updates) for c in clients]
        server.send(f"change mixed {n}")
        changed_line = await server.expect("changed")
        changed, kind = float(changed_line[1]), changed_line[4]
        try:
            await server.expect("pushed", within=10)
        except TimeoutError:
            unpushed[kind] = unpushed.get(kind, 0) + 1  # a change that changed nothing a client sees
            continue
        deadline = time.time() + 30
        while any(len(c.updates) <= b for c, b in zip(clients, before, strict=True)) and time.time() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.005)
        samples = [c.updates[b] - changed for c, b in zip(clients, before, strict=True) if len(c.updates) > b]
        latencies.append(samples)
        by_kind.setdefault(kind, []).extend(samples)
        await asyncio.sleep(0.05)  # any second response of this push arrives before the next change counts
        if n % 20 == 0 or n == changes - 1:
            server.send("rss")
            rss.append((n, int((await server.expect("rss"))[1])))
    elapsed = time.time() - started
    server.send("cpu")
    cpu_end = float((await server.expect("cpu"))[1])
    after = [(n, kib) for n, kib in rss if n >= warmup]
    slope = (
        statistics.linear_regression([n for n, _ in after], [kib for _, kib in after]).slope if len(after) > 2 else 0.0
    )
    windows = []
    for w in range(0, len(latencies), window):
        flat = [x for change in latencies[w : w + window] for x in change]
        if flat:
            windows.append(
                {
                    "changes": f"{w}-{min(w + window, len(latencies)) - 1}",
                    "p50_ms": round(pct(flat, 50) * 1000, 1),
                    "p99_ms": round(pct(flat, 99) * 1000, 1),
                    "max_ms": round(max(flat) * 1000, 1),
                }
            )
    everything = [x for change in latencies for x in change]
    return {
        "soak_changes": changes,
        "soak_seconds": round(elapsed, 1),
        "soak_warmup_changes": warmup,
        "soak_rss_slope_kib_per_change": round(slope, 2),
        "soak_rss_mib_at": {str(n): round(kib / 1024, 1) for n, kib in rss[:: max(1, len(rss) // 12)] + rss[-1:]},
        "soak_rss_after_warmup_mib_min_max": [
            round(min(k for _, k in after) / 1024, 1),
            round(max(k for _, k in after) / 1024, 1),
        ]
        if after
        else [],
        "soak_server_cpu_per_change_ms": round((cpu_end - cpu_start) / max(1, changes) * 1000, 1),
        "soak_change_to_ack_p50_ms": round(pct(everything, 50) * 1000, 1),
        "soak_change_to_ack_p99_ms": round(pct(everything, 99) * 1000, 1),
        "soak_change_to_ack_max_ms": round(max(everything) * 1000, 1),
        "soak_missed": sum(len(clients) - len(change) for change in latencies),
        "soak_unpushed_by_kind": unpushed,
        "soak_by_kind": {
            kind: {
                "changes": len(v) // max(1, len(clients)),
                "p50_ms": round(pct(v, 50) * 1000, 1),
                "p99_ms": round(pct(v, 99) * 1000, 1),
            }
            for kind, v in sorted(by_kind.items())
        },
        "soak_windows": windows,
    }


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    # The simulated clients are the measuring instrument: keep the collector's pauses out of their timings.
    gc.disable()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, 4 * args.clients + 256)), hard))
    server = Server(args.workloads, source=args.source)
    await server.start()
    result: dict[str, Any] = {"clients": args.clients, "workloads": args.workloads, "source": args.source}
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
        if args.soak:
            result.update(await soak(server, clients, args.soak))
        for n in range(0 if args.soak else args.changes):
            before = [len(c.updates) for c in clients]
            server.send(f"change pod-label {n}")
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
    if args.changes and size and not args.soak:
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
    parser.add_argument(
        "--source",
        choices=("direct", "folder"),
        default="direct",
        help="direct: a change is one object applied as a watch event would; folder: a manifest rewritten in the "
        "folder ztd watches (inotify, per-file parse)",
    )
    parser.add_argument(
        "--soak",
        type=int,
        default=0,
        metavar="N",
        help="instead of --changes: N mixed changes (pods relabelled, deleted and re-added, services, policies, "
        "namespaces leaving and rejoining ambient); RSS slope and latency over time",
    )
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
        asyncio.run(serve(args.workloads, args.port, args.source))
        return 0
    result = asyncio.run(bench(args))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
