"""From the scheduler thread to the event loop: a request's events arrive on an asyncio queue.

The scheduler calls a Job's on_event from its own thread; `loop.call_soon_threadsafe` is the one safe way to
hand something to an asyncio loop from another thread. Routes either collect everything (non-streaming
answers) or iterate over events as they come (server-sent events). Either way, when the client goes away
the jobs are cancelled and the scheduler frees their slots at its next pass.
"""

import asyncio
import time
from dataclasses import dataclass, field

from starlette.responses import Response

from .jobs import Failed, Finished, PromptDone, ServeError, Token

DISCONNECT_POLL_SECONDS = 0.5


def client_gone():
    """The answer to a client that hung up: nobody reads it; its status (nginx's "client closed request")
    shows in /metrics."""
    return Response(status_code=499)


@dataclass
class Result:
    """Everything one Job produced, for a non-streaming answer."""
    prompt: PromptDone = None
    tokens: list = field(default_factory=list)
    finished: Finished = None


class Events:
    """Events of several jobs on one asyncio queue, as (job index, event)."""

    def __init__(self, jobs):
        self.loop = asyncio.get_running_loop()
        self.queue = asyncio.Queue()
        self.jobs = jobs
        for k, job in enumerate(jobs):
            job.on_event = self._callback(k)

    def _callback(self, k):
        def on_event(event):
            try:
                self.loop.call_soon_threadsafe(self.queue.put_nowait, (k, event))
            except RuntimeError:             # the loop is closed: the server is gone, nobody is listening
                pass
        return on_event

    def cancel(self):
        for job in self.jobs:
            job.cancel()

    async def stream(self, request=None):
        """Yield (job index, event) until every job has finished; raise ServeError when one fails."""
        open_jobs = len(self.jobs)
        checked = time.monotonic()
        try:
            while open_jobs:
                if request is not None and time.monotonic() - checked > DISCONNECT_POLL_SECONDS:
                    checked = time.monotonic()           # tokens may arrive faster than the poll: look anyway
                    if await request.is_disconnected():
                        return
                try:
                    k, event = await asyncio.wait_for(self.queue.get(), DISCONNECT_POLL_SECONDS)
                except asyncio.TimeoutError:
                    continue
                if isinstance(event, Failed):
                    raise ServeError(event.message, event.kind)
                if isinstance(event, Finished):
                    open_jobs -= 1
                yield k, event
        finally:
            self.cancel()                    # no-op for finished jobs; frees the slots of the others

    async def collect(self, request):
        """A Result per job (None when the client disconnected first)."""
        results = [Result() for _ in self.jobs]
        async for k, event in self.stream(request):
            if isinstance(event, PromptDone):
                results[k].prompt = event
            elif isinstance(event, Token):
                results[k].tokens.append(event)
            elif isinstance(event, Finished):
                results[k].finished = event
        if any(r.finished is None for r in results):
            return None
        return results
