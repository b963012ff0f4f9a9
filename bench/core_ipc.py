"""What the engine-core boundary costs per step: encoding and decoding one step's outputs (msgspec msgpack),
and a round trip of that message between two processes over the same ZeroMQ ipc sockets the server uses.

    python -m bench.core_ipc [--batch 1 64] [--logprobs 0 5] [--rounds 2000]

A step message carries, per sequence, one ChoiceOutput (one new token, top-k logprobs when asked) and the
metric call the step made for that token, plus the step's own calls and the scheduler's load.
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import tempfile
import time

import zmq

from server.engine import core_messages as wire
from server.engine.engine_stats import EngineStats
from server.engine.outputs import ChoiceOutput, TokenLogprob


def step_message(batch: int, logprobs: int) -> wire.StepOutputs:
    def output(i: int) -> ChoiceOutput:
        top = [(1000 + k, -1.5 - k) for k in range(logprobs)]
        lps = [TokenLogprob(1000 + i, -1.25, top)] if logprobs else None
        return ChoiceOutput(0, [1000 + i], lps)

    outputs = [(f"cmpl-{i:032x}-0", output(i)) for i in range(batch)]
    events: list[wire.MetricEvent] = [("inter_token", (0.0123,)) for _ in range(batch)]
    events += [("step", (batch,)), ("scheduler_state", (batch, 0, batch * 16, 4096))]
    return wire.StepOutputs(outputs, events, EngineStats(batch, 0, batch * 16, 4096, 0))


def per_call_us(fn, rounds: int) -> float:
    start = time.perf_counter()
    for _ in range(rounds):
        fn()
    return (time.perf_counter() - start) / rounds * 1e6


def echo(commands: str, outputs: str) -> None:
    """The core's side: send back every message it gets, as bytes (what the core's loop would do)."""
    context = zmq.Context()
    pull, push = context.socket(zmq.PULL), context.socket(zmq.PUSH)
    pull.connect(commands)
    push.connect(outputs)
    while True:
        data = pull.recv()
        if data == b"stop":
            break
        push.send(data)
    context.destroy(linger=1000)


def round_trip_us(payload: bytes, rounds: int) -> float:
    """Median microseconds from send to the echo's arrival (one message each way, ipc, two processes)."""
    folder = tempfile.mkdtemp(prefix="core-ipc-")
    context = zmq.Context()
    push, pull = context.socket(zmq.PUSH), context.socket(zmq.PULL)
    push.bind(f"ipc://{folder}/c")
    pull.bind(f"ipc://{folder}/o")
    process = multiprocessing.get_context("spawn").Process(target=echo, args=(f"ipc://{folder}/c", f"ipc://{folder}/o"))
    process.start()
    push.send(payload)
    pull.recv()  # connected both ways
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        push.send(payload)
        pull.recv()
        times.append(time.perf_counter() - start)
    push.send(b"stop")
    process.join()
    context.destroy()
    return statistics.median(times) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--logprobs", type=int, nargs="+", default=[0, 5])
    parser.add_argument("--rounds", type=int, default=2000)
    args = parser.parse_args()
    print("| batch | logprobs | bytes | encode us | decode us | round trip us (ipc) | per token us (enc+dec+rt/2) |")
    print("|---|---|---|---|---|---|---|")
    for batch in args.batch:
        for logprobs in args.logprobs:
            message = step_message(batch, logprobs)
            data = wire.encoder.encode(message)
            encode = per_call_us(lambda m=message: wire.encoder.encode(m), args.rounds)
            decode = per_call_us(lambda d=data: wire.from_core.decode(d), args.rounds)
            rtt = round_trip_us(data, args.rounds)
            per_token = (encode + decode + rtt / 2) / batch
            print(f"| {batch} | {logprobs} | {len(data)} | {encode:.1f} | {decode:.1f} | {rtt:.1f} | {per_token:.2f} |")


if __name__ == "__main__":
    main()
