"""`python -m kvpeer.discovery`: run discovery alone and print what it sees, as JSON lines.

For operators ("which peers does this host see, with which epochs?") and for the cluster tests
and benchmark, which drive it through stdin. Each stdout line is one JSON object:
``{"event": "ready" | "added" | "updated" | "removed" | "closed", ...}`` with a wall-clock
``t``. Commands on stdin, one JSON object a line: ``{"op": "add", "keys": [hex], "first":
[hex]}``, ``{"op": "remove", "keys": [hex]}``, ``{"op": "peers"}``, ``{"op": "quit"}``.
End of input or SIGTERM quits gracefully (goodbye sent).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
import time
from typing import Any

from kvpeer.discovery import (
    Advertisement,
    DiscoveryConfig,
    InventoryLog,
    PeerEvent,
    PeerInfo,
    make_discovery,
)

log = logging.getLogger("kvpeer.discovery.agent")


def _emit(event: str, **fields: Any) -> None:
    print(json.dumps({"event": event, "t": time.time(), **fields}), flush=True)


def _peer_fields(peer: PeerInfo) -> dict[str, Any]:
    return {
        "peer": peer.node_id,
        "addresses": list(peer.addresses),
        "port": peer.port,
        "epoch": peer.epoch,
        "chunks": peer.chunk_count,
        "fingerprints": list(peer.fingerprints),
    }


def _on_event(event: PeerEvent) -> None:
    _emit(event.kind, reason=event.reason, epoch_changed=event.epoch_changed,
          **_peer_fields(event.peer))


async def run(args: argparse.Namespace) -> None:
    config = DiscoveryConfig(
        backend=args.backend,
        interfaces=tuple(args.interface),
        static_peers=tuple(args.static_peer),
        etcd_endpoints=tuple(args.etcd) or DiscoveryConfig().etcd_endpoints,
        peer_timeout_s=args.peer_timeout,
        heartbeat_interval_s=args.heartbeat,
        update_min_interval_s=args.update_interval,
        etcd_lease_ttl_s=max(2, round(args.peer_timeout)),
    )
    inventory = InventoryLog()
    discovery = make_discovery(config)

    def advert() -> Advertisement:
        return Advertisement(
            node_id=args.node_id, port=args.port, fingerprints=tuple(args.fingerprint),
            epoch=inventory.epoch, chunk_count=len(inventory),
            first_chunk_keys=inventory.first_chunk_keys(),
        )

    discovery.subscribe(_on_event)
    await discovery.start(advert())
    _emit("ready", node=args.node_id, addresses=list(discovery.addresses), epoch=inventory.epoch)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    # SIGTERM ends the input: the loop below then closes discovery, sending the goodbye.
    loop.add_signal_handler(signal.SIGTERM, reader.feed_eof)
    try:
        while line := await reader.readline():
            command = json.loads(line)
            op = command.get("op")
            if op == "add":
                inventory.add(
                    [bytes.fromhex(k) for k in command["keys"]],
                    first=[bytes.fromhex(k) for k in command.get("first", [])],
                )
                await discovery.update(advert())
                _emit("added_keys", epoch=inventory.epoch, chunks=len(inventory))
            elif op == "remove":
                inventory.remove([bytes.fromhex(k) for k in command["keys"]])
                await discovery.update(advert())
                _emit("removed_keys", epoch=inventory.epoch, chunks=len(inventory))
            elif op == "peers":
                _emit("peers", peers=[_peer_fields(p) for p in discovery.peers().values()])
            elif op == "quit":
                break
    finally:
        await discovery.close()
        _emit("closed")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m kvpeer.discovery", description=__doc__)
    parser.add_argument("--node-id", required=True)
    parser.add_argument("--port", type=int, default=7457, help="signalling port to announce")
    parser.add_argument("--backend", default="zeroconf", choices=["zeroconf", "static", "etcd"])
    parser.add_argument("--interface", action="append", default=[])
    parser.add_argument("--static-peer", action="append", default=[])
    parser.add_argument("--etcd", action="append", default=[])
    parser.add_argument("--fingerprint", action="append", default=[])
    parser.add_argument("--peer-timeout", type=float, default=10.0)
    parser.add_argument("--heartbeat", type=float, default=2.5)
    parser.add_argument("--update-interval", type=float, default=1.0)
    parser.add_argument("--log-level", default="warning")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
