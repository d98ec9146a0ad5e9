"""What is resident at the healing peak of the main job (issue 21): run `layerfold compress` in
this process with a sampler thread reading /proc/self/smaps_rollup (anonymous and file-backed
resident memory) every 10 ms, and count the live tensors by kind at the start of training, after
the first micro-batch's backward pass, and after the first optimizer step.

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/heal_profile.py [compress flags ...]
    # default flags: -q compress -o /tmp/lean21/profile-out --force --heal-tokens 4096 --no-eval

Prints one JSON object (the phases' RSS and tensor counts, the peak and the phase it came in);
``--json PATH`` (first argument) also writes it.
"""

from __future__ import annotations

import gc
import json
import resource
import sys
import threading
import time

MIB = 2 ** 20


def smaps_summary(top: int = 12) -> list:
    """The largest resident mappings: [name or size class, perms, Rss MiB, Anonymous MiB]."""
    rows, cur = [], None
    with open("/proc/self/smaps") as f:
        for line in f:
            parts = line.split()
            if "-" in parts[0] and len(parts) >= 5 and not parts[0].endswith(":"):
                a, b = (int(x, 16) for x in parts[0].split("-"))
                cur = [parts[5] if len(parts) > 5 else f"anon {(b - a) // MIB} MiB map", parts[1], 0, 0]
                rows.append(cur)
            elif parts[0] == "Rss:":
                cur[2] += int(parts[1]) / 1024
            elif parts[0] == "Anonymous:":
                cur[3] += int(parts[1]) / 1024
    agg: dict = {}
    for name, perms, rss, anon in rows:
        key = (name if not name.startswith("anon") or int(name.split()[1]) >= 32 else "anon < 32 MiB maps", perms)
        a = agg.setdefault(key, [0.0, 0.0, 0])
        a[0] += rss; a[1] += anon; a[2] += 1
    out = sorted(([k[0], k[1], round(v[0], 1), round(v[1], 1), v[2]] for k, v in agg.items()), key=lambda r: -r[2])
    return out[:top]


def rollup() -> dict:
    out = {}
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if parts[0] in ("Rss:", "Anonymous:", "Shared_Clean:", "Private_Clean:", "Private_Dirty:"):
                out[parts[0][:-1]] = int(parts[1]) * 1024
    out["File"] = out["Rss"] - out["Anonymous"]
    return out


class Sampler(threading.Thread):
    def __init__(self):
        super().__init__(daemon=True)
        self.phase, self.peak, self.peak_phase, self.by_phase, self.stop = "start", {"Rss": 0}, "", {}, False

    def run(self):
        while not self.stop:
            r = rollup()
            if r["Rss"] > self.peak["Rss"]:
                self.peak, self.peak_phase = r, self.phase
            p = self.by_phase.setdefault(self.phase, {"Rss": 0})
            if r["Rss"] > p["Rss"]:
                self.by_phase[self.phase] = r
            time.sleep(0.01)


def tensors(model=None, optimizer=None) -> dict:
    """Live tensor bytes by kind, each storage once."""
    import torch

    kinds: dict[int, str] = {}
    if model is not None:
        for n, p in model.named_parameters():
            kinds.setdefault(p.untyped_storage().data_ptr(),
                             "trainable" if p.requires_grad else ("embedding/head" if "embed" in n or "lm_head" in n
                                                                 else "frozen layers"))
            if p.grad is not None:
                kinds.setdefault(p.grad.untyped_storage().data_ptr(), "grads")
        for n, b in model.named_buffers():
            kinds.setdefault(b.untyped_storage().data_ptr(), "buffers")
    if optimizer is not None:
        for st in optimizer.state.values():
            for v in st.values():
                if torch.is_tensor(v):
                    kinds.setdefault(v.untyped_storage().data_ptr(), "adam state")
    seen, by_kind, big = set(), {}, []
    for o in gc.get_objects():
        try:
            if not torch.is_tensor(o):
                continue
            s = o.untyped_storage()
        except Exception:
            continue
        ptr = s.data_ptr()
        if ptr in seen or ptr == 0:
            continue
        seen.add(ptr)
        k = kinds.get(ptr, "other")
        by_kind[k] = by_kind.get(k, 0) + s.nbytes()
        if k == "other" and s.nbytes() > 4 * MIB:
            big.append([list(o.shape), str(o.dtype), round(s.nbytes() / MIB, 1)])
    return {"MiB": {k: round(v / MIB, 1) for k, v in sorted(by_kind.items())},
            "total_MiB": round(sum(by_kind.values()) / MIB, 1), "other_over_4MiB": sorted(big, key=lambda b: -b[2])[:12]}


def main() -> int:
    argv = sys.argv[1:]
    out_json = None
    if argv[:1] == ["--json"]:
        out_json, argv = argv[1], argv[2:]
    flags = argv or ["-q", "compress", "-o", "/tmp/lean21/profile-out", "--force", "--heal-tokens", "4096", "--no-eval"]
    sampler = Sampler()
    sampler.start()
    report: dict = {"flags": flags, "phases": {}}

    def mark(phase, **kw):
        sampler.phase = phase
        report["phases"][phase] = {"rss_MiB": round(rollup()["Rss"] / MIB, 1), "maps": smaps_summary(), **kw}

    mark("import")
    import torch  # noqa: F401

    import layerfold.train.loop as loop
    from layerfold.cli import main as cli_main

    mark("torch+layerfold imported")
    real_fit, real_step, real_opt = loop.fit, loop._step, loop._optimizer
    state = {"model": None, "opt": None, "steps": 0}

    def fit(model, *a, **kw):
        state["model"] = model
        mark("training starts", tensors=tensors(model))
        try:
            return real_fit(model, *a, **kw)
        finally:
            mark("after training")

    def optimizer(*a, **kw):
        state["opt"] = real_opt(*a, **kw)
        return state["opt"]

    def step(objective, *a, **kw):
        if state["steps"] == 0:  # the first micro-batch's backward: count what is live at its end
            real_call = objective.__call__ if not hasattr(objective, "_profiled") else None
            if real_call is not None:
                orig = type(objective).__call__

                def call(self, *ca, **ckw):
                    loss, parts = orig(self, *ca, **ckw)
                    mark("first micro-batch forward done", tensors=tensors(state["model"], state["opt"]))
                    sampler.phase = "micro-batches"
                    return loss, parts

                type(objective).__call__ = call
                objective._profiled = True
        r = real_step(objective, *a, **kw)
        state["steps"] += 1
        if state["steps"] == 1:
            type(objective).__call__ = orig_call[0]
            mark("after optimizer step 1", tensors=tensors(state["model"], state["opt"]))
            sampler.phase = "training"
        return r

    orig_call: list = []

    def remember(f):
        def g(objective, *a, **kw):
            if not orig_call:
                orig_call.append(type(objective).__call__)
            return f(objective, *a, **kw)
        return g

    loop.fit, loop._step, loop._optimizer = fit, remember(step), optimizer
    import layerfold.healing as healing

    if hasattr(healing, "fit"):
        healing.fit = fit
    t = time.perf_counter()
    rc = cli_main(flags)
    sampler.stop = True
    sampler.join()
    report["seconds"] = round(time.perf_counter() - t, 1)
    report["peak"] = {k: round(v / MIB, 1) for k, v in sampler.peak.items()}
    report["peak_phase"] = sampler.peak_phase
    report["phase_peaks_MiB"] = {k: {kk: round(vv / MIB, 1) for kk, vv in v.items()} for k, v in sampler.by_phase.items()}
    report["ru_maxrss_MiB"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    text = json.dumps(report, indent=1)
    print(text)
    if out_json:
        with open(out_json, "w") as f:
            f.write(text + "\n")
    return rc or 0


if __name__ == "__main__":
    sys.exit(main())
