"""gateway_batch_chunks: chunked HTTP/1 bodies handed on in batches (mitm/chunks.py).

mitmproxy passes every chunk of a chunked body through its HTTP layers, the stream callable and a write as an
event of its own (about 100 µs each); an SSE answer is a chunk per event, so a fast stream of small events is
limited by that. With the option on (the default) every chunk already received is handed on at once: the same
bytes, fewer and larger writes to the client, and the relay still gives every event to every tap. Off: one chunk
at a time, as in bare mitmproxy (for comparison: scripts/bench measures both).
"""

from __future__ import annotations

from mitmproxy import ctx

from llm_gateway.mitm import chunks


class ChunkBatching:
    def load(self, loader) -> None:
        loader.add_option(
            "gateway_batch_chunks", bool, True,
            "Hand on every chunk of a chunked HTTP/1 body already received at once, instead of one event per "
            "chunk: a stream of small SSE events passes several times faster, bytes unchanged.",
        )

    def configure(self, updated: set[str]) -> None:
        if "gateway_batch_chunks" in updated:
            if ctx.options.gateway_batch_chunks:
                chunks.install()
            else:
                chunks.uninstall()

    def done(self) -> None:
        chunks.uninstall()
