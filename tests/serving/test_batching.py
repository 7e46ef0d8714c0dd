"""serving.batching.TickBatcher: the calls of one event-loop tick share one batch."""

from __future__ import annotations

import asyncio


def test_tick_batcher_runs_the_calls_of_one_loop_tick_together():
    from serving.batching import TickBatcher

    seen: list[list[int]] = []

    def double(xs: list[int]) -> list[int]:
        seen.append(list(xs))
        if 13 in xs:
            raise ValueError("unlucky")
        return [2 * x for x in xs] if 7 not in xs else []

    b = TickBatcher(double)

    async def run():
        together = await asyncio.gather(*(b(i) for i in range(5)))  # made in one tick: one call
        alone = await b(10)
        mixed = await asyncio.gather(b(1), b(13), return_exceptions=True)
        short = await asyncio.gather(b(7), return_exceptions=True)
        return together, alone, mixed, short

    together, alone, mixed, short = asyncio.run(run())
    assert together == [0, 2, 4, 6, 8] and alone == 20
    assert seen[:2] == [[0, 1, 2, 3, 4], [10]]
    assert mixed[0] == 2 and isinstance(mixed[1], ValueError) and "unlucky" in str(mixed[1])  # only 13 fails
    assert seen[2:5] == [[1, 13], [1], [13]]  # the failed batch, then each input alone
    assert isinstance(short[0], RuntimeError) and "0 results for 1 inputs" in str(short[0])


def test_tick_batcher_caps_its_batches_and_survives_a_cancelled_caller():
    from serving.batching import TickBatcher

    sizes: list[int] = []
    b = TickBatcher(lambda xs: sizes.append(len(xs)) or [x + 1 for x in xs], max_batch=2)

    async def run():
        calls = [asyncio.ensure_future(b(i)) for i in range(5)]
        await asyncio.sleep(0)  # every call has joined the tick's batch
        calls[1].cancel()
        return await asyncio.gather(*calls, return_exceptions=True)

    got = asyncio.run(run())
    assert sizes == [2, 2, 1] and (b.calls, b.batches) == (5, 3)
    assert got[0] == 1 and isinstance(got[1], asyncio.CancelledError) and got[2:] == [3, 4, 5]
