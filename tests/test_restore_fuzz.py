"""Fuzz: corrupt Context checkpoints and integrator XML must fail cleanly, never crash.

Hundreds of seeded truncations, bit flips and overwritten size fields of a real checkpoint
(``Context.createCheckpoint`` of an ``app.Simulation`` driven by ``CGMLIntegrator``, and of
one written with another seq_len) and truncations and flips of a real integrator XML
(``XmlSerializer.serialize``) and of its decoded payloads are loaded in a worker subprocess, so that a segfault or an
abort is a failed case instead of the end of pytest. Every case must end in a Python
exception or in a successful load whose history has the right shape and is finite (a flip
inside a float payload may legitimately load). The worker reports each case as it goes;
if it dies, the case it was on is the crash (confirmed by rerunning it alone) and a new
worker continues with the rest.

Run as a script (``python tests/test_restore_fuzz.py``) to print the counts; this file is
also the worker (``python tests/test_restore_fuzz.py worker DIR START STOP``).
"""
from __future__ import annotations

import base64
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

N_BEADS = 5
SEQ_LEN = 3
SEED = 20261202
CASES_PER_KIND = {"truncate": 100, "flip": 150, "field": 100, "payload": 150}
FOREIGN = "intact, of another seq_len"
MAX_CRASHES = int(os.environ.get("CGML_FUZZ_MAX_CRASHES", "10"))


# --- the inputs ----------------------------------------------------------------------------
def make_inputs(workdir: Path) -> tuple[bytes, bytes, dict[int, tuple[bytes, bytes]]]:
    """A real checkpoint and a real integrator XML, the model files the worker needs, and
    the checkpoint and XML of the same set-up with other seq_len values (foreign inputs)."""
    import openmm
    from openmm import app

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from openmm_cgml import CGMLIntegrator
    from toy_models import GaussianScore, HarmonicDynamics, save

    save(GaussianScore(tau=1.0, sigmas=(0.2, 0.05), langevin_steps=2, langevin_step_size=1e-4),
         workdir / "score.pt")
    made = {}
    for seq_len in (SEQ_LEN, 2, 5):
        name = "dynamics.pt" if seq_len == SEQ_LEN else f"dynamics{seq_len}.pt"
        save(HarmonicDynamics(k=0.05, std=0.01, seq_len=seq_len), workdir / name)
        integrator = configured_integrator(CGMLIntegrator, workdir, name)
        topology, system = make_system(openmm, app)
        simulation = app.Simulation(topology, system, integrator, openmm.Platform.getPlatformByName("Reference"))
        simulation.context.setPositions(np.random.default_rng(1).uniform(-1, 1, (N_BEADS, 3)))
        simulation.step(3)
        made[seq_len] = simulation.context.createCheckpoint(), openmm.XmlSerializer.serialize(integrator).encode()
    checkpoint, xml = made.pop(SEQ_LEN)
    return checkpoint, xml, made


def configured_integrator(cls, workdir: Path, dynamics: str = "dynamics.pt"):
    integrator = cls(workdir / dynamics, workdir / "score.pt")
    integrator.setRandomNumberSeed(42)
    integrator.setBeadFeatures(np.arange(N_BEADS * 2, dtype=np.float32).reshape(N_BEADS, 2))
    integrator.setBonds([[0, 1], [1, 2], [3, 4]])
    return integrator


def make_system(openmm, app):
    system = openmm.System()
    topology = app.Topology()
    residue = topology.addResidue("CG", topology.addChain())
    for _ in range(N_BEADS):
        system.addParticle(2.0)
        topology.addAtom("B", None, residue)
    return topology, system


def flip(data: bytes, rng: np.random.Generator, low: int, high: int, ascii_only: bool) -> bytes:
    """Flip 1-3 random bits at positions in [low, high)."""
    out = bytearray(data)
    for _ in range(int(rng.integers(1, 4))):
        position = int(rng.integers(low, max(low + 1, min(high, len(out)))))
        out[position] ^= 1 << int(rng.integers(0, 7 if ascii_only else 8))
    return bytes(out)


def payload(xml: bytes, element: str) -> tuple[int, int]:
    """Start and end of the base64 value of <element> in the XML."""
    start = xml.index(b"<" + element.encode() + b" ")
    start = xml.index(b'base64="', start) + len(b'base64="')
    return start, xml.index(b'"', start)


def with_payload(xml: bytes, element: str, data: bytes) -> bytes:
    start, end = payload(xml, element)
    return xml[:start] + base64.b64encode(data) + xml[end:]


def header_fields(checkpoint: bytes) -> list[tuple[str, int]]:
    """Offsets of the int64 header fields of the integrator's part of a checkpoint."""
    ours = checkpoint.find(b"CGMLCKP1")
    fields = [("history dims", ours + 9)] + [(f"history size {i}", ours + 17 + 8 * i) for i in range(3)]
    rng = ours + 9 + 8 * 4 + 8 * int(np.prod(np.frombuffer(checkpoint[ours + 17:ours + 41], np.int64)))
    return fields + [("rng dims", rng), ("rng size", rng + 8)]


def make_cases(checkpoint: bytes, xml: bytes, foreign: dict[int, tuple[bytes, bytes]]) -> list[tuple[str, str, bytes]]:
    """(kind, description, bytes); the first case of each kind is the pristine input.

    Byte-level truncations and flips (of our checkpoint, or of one written by an integrator
    with another seq_len), overwritten size fields, and, for the XML, truncations and flips
    of the decoded base64 payloads (a byte-level edit of base64 never changes a payload's
    length, so it would not reach the length checks)."""
    rng = np.random.default_rng(SEED)
    cases = [("checkpoint", "pristine", checkpoint)]
    bases = [("own", checkpoint)] * 3 + [(f"seq_len {k}", c) for k, (c, _) in foreign.items()]
    cases += [("checkpoint", f"seq_len {k}: {FOREIGN}", c) for k, (c, _) in foreign.items()]
    for i in range(CASES_PER_KIND["truncate"]):
        label, base = bases[i % len(bases)]
        ours = base.find(b"CGMLCKP1")
        cut = int(rng.integers(ours, ours + 500)) if i % 2 else int(rng.integers(0, len(base)))
        cases.append(("checkpoint", f"{label}: truncate at {cut}/{len(base)}", base[:cut]))
    for i in range(CASES_PER_KIND["flip"]):
        label, base = bases[i % len(bases)]
        ours = base.find(b"CGMLCKP1")
        low, high = [(ours, ours + 80), (ours, ours + 80), (ours, len(base)), (0, len(base))][i % 4]
        cases.append(("checkpoint", f"{label}: flip in [{low}, {high})", flip(base, rng, low, high, False)))
    for i in range(CASES_PER_KIND["field"]):
        label, base = bases[i % len(bases)]
        name, offset = header_fields(base)[int(rng.integers(0, 6))]
        value = [int(rng.integers(-2, 12)), int(rng.integers(1 << 20, 1 << 62)), -int(rng.integers(1, 1 << 62)),
                 int(rng.integers(0, 5000))][i % 4]
        edited = base[:offset] + value.to_bytes(8, "little", signed=True) + base[offset + 8:]
        cases.append(("checkpoint", f"{label}: {name} = {value}", edited))

    cases.append(("xml", "pristine", xml))
    regions = [payload(xml, "State")[0] + np.array([0, 120]),                # State: header sizes
               (xml.index(b"<BeadFeatures"), xml.index(b"<State")),        # features, bonds
               (0, xml.index(b"<DynamicsModel")),                          # root attributes
               (0, len(xml))]                                              # anywhere (mostly models)
    for i in range(CASES_PER_KIND["truncate"]):
        cut = int(rng.integers(0, len(xml)))
        cases.append(("xml", f"truncate at {cut}/{len(xml)}", xml[:cut]))
    for i in range(CASES_PER_KIND["flip"]):
        low, high = (int(v) for v in regions[i % len(regions)])
        cases.append(("xml", f"flip in [{low}, {high})", flip(xml, rng, low, high, True)))
    elements = ["State", "BeadFeatures", "Bonds"]
    for i in range(CASES_PER_KIND["payload"]):
        element = elements[i % len(elements)]
        start, end = payload(xml, element)
        data = base64.b64decode(xml[start:end])
        if element == "State" and i in (0, 6):  # the state of an integrator with another seq_len
            other, (_, other_xml) = list(foreign.items())[(i // 6) % len(foreign)]
            o_start, o_end = payload(other_xml, "State")
            data, what = base64.b64decode(other_xml[o_start:o_end]), f"{FOREIGN}, seq_len {other}"
        elif i % 2:
            cut = int(rng.integers(0, len(data) + 1))
            extra = bytes(rng.integers(0, 256, int(rng.integers(0, 20))).astype(np.uint8)) if i % 4 == 1 else b""
            data, what = data[:cut] + extra, f"truncated to {cut} bytes + {len(extra)}"
        else:
            high = min(len(data), 80) if element == "State" else len(data)
            data, what = (flip(data, rng, 0, high, False) if data else b"\0"), "bits flipped"
        cases.append(("xml", f"<{element}> payload {what}", with_payload(xml, element, data)))
    return cases


# --- the worker: one process, many cases, one line per case ---------------------------------
def worker(workdir: Path, start: int, stop: int) -> None:
    import warnings

    warnings.filterwarnings("ignore")
    import openmm
    from openmm import app

    import openmm_cgml
    from openmm_cgml import CGMLIntegrator

    print(f"# openmm_cgml from {openmm_cgml.__file__}", flush=True)
    cases = pickle.loads((workdir / "cases.pkl").read_bytes())
    platform = openmm.Platform.getPlatformByName("Reference")
    topology, system = make_system(openmm, app)
    integrator = configured_integrator(CGMLIntegrator, workdir)
    context = openmm.Context(system, integrator, platform)
    positions = np.zeros((N_BEADS, 3))

    def check_history(integ) -> str:
        history = integ.getHistory()
        if history is None:
            return ""
        values = np.asarray(history._value)
        if values.shape != (SEQ_LEN, N_BEADS, 3):
            return f"history has shape {values.shape}"
        if not np.all(np.isfinite(values)):
            return "history is not finite"
        return ""

    for index in range(start, min(stop, len(cases))):
        kind, _, data = cases[index]
        try:
            if kind == "checkpoint":
                context.loadCheckpoint(data)
                loaded = integrator
            else:
                text = data.decode("latin-1")
                if index % 2:
                    loaded = CGMLIntegrator.deserialize(text)
                else:  # openmm's own entry point: a plain openmm.Integrator
                    loaded = openmm.XmlSerializer.deserialize(text)
        except Exception as error:  # a clean failure
            print(f"{index} exception {type(error).__name__}: {str(error).splitlines()[0][:150]!r}", flush=True)
            continue
        problem = check_history(loaded) if isinstance(loaded, CGMLIntegrator) else ""
        note = ""
        try:  # use what was loaded: it must step or refuse cleanly
            if kind == "checkpoint":
                integrator.step(1)
            else:
                other = openmm.Context(system, loaded, platform)
                other.setPositions(positions)
                loaded.step(1)
                del other
            problem = problem or (check_history(loaded) if isinstance(loaded, CGMLIntegrator) else "")
        except Exception as error:
            note = f" (then: {type(error).__name__}: {str(error).splitlines()[0][:100]!r})"
        print(f"{index} {'bad ' + repr(problem) if problem else 'loaded'}{note}", flush=True)


# --- the harness ----------------------------------------------------------------------------
def run_worker(workdir: Path, start: int, stop: int, timeout: float = 120) -> tuple[dict[int, str], int]:
    command = [sys.executable, str(Path(__file__).resolve()), "worker", str(workdir), str(start), str(stop)]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        stdout, code = result.stdout, result.returncode
    except subprocess.TimeoutExpired as expired:
        output = expired.stdout or b""
        stdout, code = (output.decode() if isinstance(output, bytes) else output), -999  # a hang counts as a crash
    outcomes = {}
    for line in stdout.splitlines():
        if line and not line.startswith("#"):
            index, outcome = line.split(" ", 1)
            outcomes[int(index)] = outcome
    return outcomes, code


def fuzz(workdir: Path) -> dict:
    checkpoint, xml, foreign = make_inputs(workdir)
    cases = make_cases(checkpoint, xml, foreign)
    (workdir / "cases.pkl").write_bytes(pickle.dumps(cases))
    outcomes: dict[int, str] = {}
    crashes: dict[int, str] = {}
    start, workers = 0, 0
    while start < len(cases):
        got, code = run_worker(workdir, start, len(cases))
        workers += 1
        outcomes.update(got)
        if code == 0:
            break
        culprit = next(i for i in range(start, len(cases)) if i not in outcomes)
        # confirm alone: a crash caused by an earlier case's damage would not repeat
        alone, alone_code = run_worker(workdir, culprit, culprit + 1) if len(crashes) < MAX_CRASHES else ({}, code)
        workers += 1
        if alone_code == 0:
            outcomes.update(alone)
            crashes[culprit] = f"worker died with code {code} here, but the case alone did not crash (earlier damage)"
        else:
            crashes[culprit] = f"crash (exit code {alone_code})"
        if len(crashes) >= MAX_CRASHES:
            break
        start = culprit + 1
    summary = {"cases": len(cases), "workers": workers, "crashes": crashes, "outcomes": outcomes,
               "descriptions": [f"{kind}: {what}" for kind, what, _ in cases]}
    for kind in ("checkpoint", "xml"):
        indices = [i for i, case in enumerate(cases) if case[0] == kind]
        summary[kind] = {
            "cases": len(indices),
            # a case that killed the worker counts as a crash even if it ran cleanly alone
            "exceptions": sum(outcomes.get(i, "").startswith("exception") and i not in crashes for i in indices),
            "loads": sum(outcomes.get(i, "").startswith("loaded") and i not in crashes for i in indices),
            "bad loads": sum(outcomes.get(i, "").startswith("bad") and i not in crashes for i in indices),
            "crashes": sum(i in crashes for i in indices),
            "not run": sum(i not in outcomes and i not in crashes for i in indices),
        }
    return summary


def describe(summary: dict) -> str:
    lines = [f"{summary['cases']} cases, {summary['workers']} worker process(es)"]
    for kind in ("checkpoint", "xml"):
        lines.append(f"  {kind}: " + ", ".join(f"{k} {v}" for k, v in summary[kind].items()))
    for index, what in summary["crashes"].items():
        lines.append(f"  CRASH case {index} ({summary['descriptions'][index]}): {what}")
    for index, outcome in sorted(summary["outcomes"].items()):
        if outcome.startswith("bad"):
            lines.append(f"  BAD case {index} ({summary['descriptions'][index]}): {outcome}")
    foreign = [i for i, what in enumerate(summary["descriptions"]) if FOREIGN in what]
    accepted = [i for i in foreign if not summary["outcomes"].get(i, "").startswith("exception")]
    lines.append(f"  intact inputs of another seq_len: {len(foreign)}, not refused: {len(accepted)}")
    for index in accepted:
        lines.append(f"  ACCEPTED case {index} ({summary['descriptions'][index]}): "
                     f"{summary['outcomes'].get(index, 'crash')}")
    return "\n".join(lines)


def test_corrupt_checkpoints_and_xml_fail_cleanly(tmp_path):
    start = time.perf_counter()
    summary = fuzz(tmp_path)
    report = describe(summary) + f"\n  {time.perf_counter() - start:.1f} s"
    print(report)
    assert not summary["crashes"], report
    for kind in ("checkpoint", "xml"):
        counts = summary[kind]
        assert counts["bad loads"] == 0 and counts["not run"] == 0, report
        # not vacuous: the pristine input loads, and corruption mostly raises
        first = summary["descriptions"].index(f"{kind}: pristine")
        assert summary["outcomes"][first].startswith("loaded"), report
        assert counts["exceptions"] > counts["cases"] // 2, report
        assert counts["exceptions"] + counts["loads"] == counts["cases"], report
    # an intact checkpoint / State of an integrator with another seq_len must be refused
    foreign = [i for i, what in enumerate(summary["descriptions"]) if FOREIGN in what]
    assert len(foreign) >= 4, report
    for index in foreign:
        assert summary["outcomes"][index].startswith("exception"), report


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "worker":
        worker(Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
    else:
        import tempfile
        import warnings

        warnings.filterwarnings("ignore")
        with tempfile.TemporaryDirectory() as directory:
            began = time.perf_counter()
            print(describe(fuzz(Path(directory))), f"\n  {time.perf_counter() - began:.1f} s")
