"""``CGMLIntegrator``: the Python face of the C++ learned integrator.

It is a real :class:`openmm.Integrator`: its SWIG ``this`` points at the C++ object
that pybind11 owns, so an unmodified :class:`openmm.Context` or
:class:`openmm.app.Simulation` drives it, and every ``openmm.Integrator`` method
(``getStepSize``, ``step``, ...) works. The step itself runs in C++ (TorchScript),
with the GIL released by openmm's own ``step`` wrapper.

The TorchScript contract the models must follow is in ``docs/contract.md``.

Trust: integrator XML (``XmlSerializer``, pickles of this class) carries the TorchScript
models, which are code, and Context checkpoints are loaded into them; treat both like
PyTorch treats pickles and load them only from trusted sources. Restoring validates
shapes, sizes and lengths, so a corrupt, truncated or mismatched file raises a clean
exception instead of crashing, but that does not make an untrusted file safe.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import openmm
from openmm import unit

from openmm_cgml import _cgml

__all__ = ["CGMLIntegrator", "CGMLError"]

#: Raised (as a RuntimeError subclass) by C++ errors outside openmm's own wrappers;
#: errors inside ``step`` reach Python as ``openmm.OpenMMException``.
CGMLError = _cgml.CGMLError


def _read_model(path, what: str) -> bytes:
    if isinstance(path, (bytes, bytearray)):
        return bytes(path)
    path = Path(os.fspath(path))
    if not path.is_file():
        raise FileNotFoundError(f"{what} model file not found: {path}")
    return path.read_bytes()


def _in_units(value, quantity_unit, what: str) -> float:
    if unit.is_quantity(value):
        if not value.unit.is_compatible(quantity_unit):
            raise TypeError(f"{what} must be in units compatible with {quantity_unit}, got {value.unit}")
        return value.value_in_unit(quantity_unit)
    return float(value)


def _length_array(value, what: str) -> np.ndarray:
    if unit.is_quantity(value):
        if not value.unit.is_compatible(unit.nanometer):
            raise TypeError(f"{what} must be a length, got {value.unit}")
        value = value.value_in_unit(unit.nanometer)
    return np.asarray(value, dtype=np.float64)


class CGMLIntegrator(openmm.Integrator):
    """Advance a coarse-grained System by one learned step per ``step()`` (Fu et al., TMLR 2023).

    Parameters
    ----------
    dynamicsModel : path or bytes
        TorchScript archive of the dynamics model (``dynamics.pt``).
    scoreModel : path or bytes, optional
        TorchScript archive of the score model (``score.pt``); without it, no refinement.
    stepSize : float (ps) or time Quantity, optional
        Defaults to the dynamics model's ``step_size_ps``. A different value is refused
        unless ``allowStepSizeOverride=True``: the model predicts steps of its own size.

    Each step: ``mean, std, latent = dynamics(history, box, features, bonds)``;
    ``a = mean + std z`` (``a = mean`` when deterministic); ``x = x_t + (x_t - x_{t-1}) + a``;
    then, with a score model, for each sigma_i of its ladder (or of its smallest
    :meth:`setLangevinLevels` levels), ``K`` times
    ``x += a_i * score(x, latent, ..., sigma_i) + sqrt(2 a_i) z'``, with ``a_i = eps``
    (schedule ``"constant"``) or ``a_i = eps sigma_i^2 / sigma_L^2`` (``"ncsn"``; see
    :meth:`setLangevinSchedule`). The context's positions
    become ``x``, its velocities ``(x - x_t) / dt``; time and step count advance.
    """

    def __init__(self, dynamicsModel, scoreModel=None, stepSize=None, *, allowStepSizeOverride=False):
        dynamics = _read_model(dynamicsModel, "dynamics")
        score = None if scoreModel is None else _read_model(scoreModel, "score")
        step = 0.0 if stepSize is None else _in_units(stepSize, unit.picosecond, "stepSize")
        if stepSize is not None and not step > 0:
            raise ValueError(f"stepSize must be positive, got {stepSize}")
        self._attach(_cgml.CGMLIntegratorImpl(dynamics, score, step, bool(allowStepSizeOverride)))

    def _attach(self, impl) -> None:
        # Do not call openmm.Integrator.__init__ (abstract in SWIG): point `this` at our object.
        self._impl = impl
        self.this = impl.swigPointer()

    # SWIG must never delete the C++ object: pybind11 owns it through self._impl.
    @property
    def thisown(self):
        return False

    @thisown.setter
    def thisown(self, value):
        pass

    # --- model information ------------------------------------------------------------
    def getSequenceLength(self) -> int:
        """Number of frames (one step apart) the dynamics model reads."""
        return self._impl.getSequenceLength()

    def getModelStepSize(self) -> unit.Quantity:
        """The step size the dynamics model was trained for."""
        return self._impl.getModelStepSize() * unit.picosecond

    def hasScoreModel(self) -> bool:
        return self._impl.hasScoreModel()

    def getSigmas(self) -> unit.Quantity:
        """The score model's noise ladder, largest first (empty without a score model)."""
        return np.asarray(self._impl.getSigmas()) * unit.nanometer

    # --- graph inputs ---------------------------------------------------------------------
    def setBeadFeatures(self, features) -> None:
        """Per-bead features ``[N, F]`` (embedding ++ mass, as the models were trained).

        ``N`` must be the System's particle count, and ``F`` the width the models declare
        (their ``num_features`` attribute) when they declare one."""
        features = np.asarray(features)
        if features.dtype.kind not in "fiu":
            raise ValueError(f"bead features must be numbers (a float array [beads, features]), "
                             f"got dtype {features.dtype}")
        if features.ndim != 2:
            raise ValueError(f"bead features must be a 2-D array [beads, features], got shape {features.shape}")
        self._impl.setBeadFeatures(features.astype(np.float32))

    def getBeadFeatures(self) -> np.ndarray:
        return self._impl.getBeadFeatures()

    def setBonds(self, bonds) -> None:
        """CG bonds ``[E, 2]``: one row per bond (bead i, bead j), each bond once; ``E`` may
        be 0. Integer (or integer-valued) bead indices, in range of the System. A ``[2, E]``
        edge index must be transposed first: it is refused, not reinterpreted."""
        bonds = np.asarray(bonds)
        if bonds.size == 0 and bonds.ndim == 1:  # [] : no bonds
            bonds = np.zeros((0, 2), np.int64)
        if bonds.dtype.kind == "b" or bonds.dtype.kind not in "fiu":
            raise ValueError(f"bonds must be integer bead indices, got dtype {bonds.dtype}")
        if bonds.ndim != 2 or bonds.shape[1] != 2:
            raise ValueError(f"bonds must have shape [E, 2] (one row per bond), got {bonds.shape}")
        if bonds.dtype.kind == "f" and not np.all(np.isfinite(bonds) & (bonds == np.round(bonds))):
            raise ValueError("bonds must be integer bead indices, got non-integer values")
        if bonds.size and bonds.min() < 0:
            raise ValueError(f"bonds must be bead indices >= 0, got a negative index {bonds.min()}")
        if bonds.size and bonds.max() >= 2**31:
            raise ValueError(f"bond index {bonds.max()} is out of range for any OpenMM System")
        self._impl.setBonds(bonds.astype(np.int64))

    def getBonds(self) -> np.ndarray:
        return self._impl.getBonds()

    # --- history ----------------------------------------------------------------------------
    def setHistory(self, frames) -> None:
        """Set the frames the next step starts from: ``[T, N, 3]`` in nm (or a length
        Quantity), oldest first, one model step apart; only the last ``seq_len`` are kept.
        If bound to a context, its positions and velocities are set from them; otherwise
        they replace the context's state at the first step."""
        frames = _length_array(frames, "the history")
        if frames.ndim != 3 or frames.shape[2] != 3:
            raise ValueError(f"the history must have shape [frames, beads, 3], got {frames.shape}")
        self._impl.setHistory(frames)

    def getHistory(self) -> unit.Quantity | None:
        """The last ``seq_len`` frames, ``[T, N, 3]`` nm, oldest first (None before the first step)."""
        history = self._impl.getHistory()
        return None if history is None else history * unit.nanometer

    # --- sampling -----------------------------------------------------------------------------
    def setRandomNumberSeed(self, seed: int) -> None:
        """Seed of the random generator; 0 (default) picks a new seed for each Context."""
        self._impl.setRandomNumberSeed(int(seed))

    def getRandomNumberSeed(self) -> int:
        return self._impl.getRandomNumberSeed()

    def setDeterministic(self, deterministic: bool) -> None:
        """Use the predicted mean acceleration and no Langevin noise."""
        self._impl.setDeterministic(bool(deterministic))

    def getDeterministic(self) -> bool:
        return self._impl.getDeterministic()

    def setLangevinSteps(self, steps: int) -> None:
        """Annealed Langevin steps per noise level (K); 0 disables refinement."""
        self._impl.setLangevinSteps(int(steps))

    def getLangevinSteps(self) -> int:
        return self._impl.getLangevinSteps()

    def setLangevinStepSize(self, eps) -> None:
        """Langevin step size eps, in nm^2 (accepts an area Quantity)."""
        self._impl.setLangevinStepSize(_in_units(eps, unit.nanometer**2, "the Langevin step size"))

    def getLangevinStepSize(self) -> float:
        return self._impl.getLangevinStepSize()

    def setLangevinSchedule(self, schedule: str) -> None:
        """Step size of each noise level: ``"constant"`` (every level uses eps) or ``"ncsn"``
        (Song & Ermon 2019: level i uses ``eps * sigma_i**2 / sigma_L**2``, sigma_L the
        smallest sigma of the ladder, so the last level uses eps). The default is the score
        model's ``langevin_schedule`` attribute, or ``"constant"`` if it has none. Any other
        value raises ValueError."""
        if not isinstance(schedule, str):
            raise TypeError(f"the Langevin schedule must be a str (\"constant\" or \"ncsn\"), "
                            f"got {type(schedule).__name__}")
        self._impl.setLangevinSchedule(schedule)

    def getLangevinSchedule(self) -> str:
        return self._impl.getLangevinSchedule()

    def getNumNoiseLevels(self) -> int:
        """Noise levels of the score model's ladder (0 without a score model)."""
        return self._impl.getNumNoiseLevels()

    def setLangevinLevels(self, levels: int) -> None:
        """Refine over the ``levels`` smallest noise levels of the ladder only (default:
        all of them): fewer score calls per step; the levels kept use their usual step
        sizes. Must be in ``[1, getNumNoiseLevels()]``, else ValueError."""
        if isinstance(levels, bool) or not isinstance(levels, (int, np.integer)):
            raise TypeError(f"the number of Langevin levels must be an int, got {type(levels).__name__}")
        self._impl.setLangevinLevels(int(levels))

    def getLangevinLevels(self) -> int:
        return self._impl.getLangevinLevels()

    def getLangevinStepSizes(self) -> np.ndarray:
        """The Langevin step size of each level of the ladder (nm^2) under the current
        schedule and step size (empty without a score model)."""
        return np.asarray(self._impl.getLangevinStepSizes(), dtype=np.float64)

    def setExclusionDistance(self, distance) -> None:
        """Excluded volume: after each step (and its refinement), beads that are not
        CG-bonded and closer than ``distance`` (nm, or a length Quantity) are pushed apart
        to exactly that distance, each pair's centre of mass fixed (so momentum is
        conserved); pairs are resolved in turn, as SHAKE resolves constraints. 0 turns it
        off. The default is the dynamics model's ``exclusion_distance`` attribute (which
        ``cgml export`` sets from the training data's closest approach), else 0."""
        self._impl.setExclusionDistance(_in_units(distance, unit.nanometer, "the exclusion distance"))

    def getExclusionDistance(self) -> unit.Quantity:
        return self._impl.getExclusionDistance() * unit.nanometer

    def getExclusionCorrections(self) -> int:
        """Bead pairs moved apart by the excluded-volume correction since the integrator
        was created: how often the learned step alone would have overlapped beads."""
        return self._impl.getExclusionCorrections()

    def setBondLengthLimit(self, limit) -> None:
        """Bond-length limit: after each step (and its refinement), CG-bonded beads farther
        apart than ``limit`` (nm, or a length Quantity) are pulled in to exactly that
        distance, each pair's centre of mass fixed, in the same sweeps as the excluded
        volume. 0 turns it off. The default is the dynamics model's ``bond_length_limit``
        attribute (set by training from the data's longest CG bonds), else 0."""
        self._impl.setBondLengthLimit(_in_units(limit, unit.nanometer, "the bond-length limit"))

    def getBondLengthLimit(self) -> unit.Quantity:
        return self._impl.getBondLengthLimit() * unit.nanometer

    def getBondLimitCorrections(self) -> int:
        """CG bonds shortened by the bond-length limit since the integrator was created."""
        return self._impl.getBondLimitCorrections()

    def setCompiledDynamicsModel(self, package) -> None:
        """Run the dynamics network from an AOTInductor package compiled on this machine
        (:func:`openmm_cgml.compiled.compile_network`; ``LearnedSimulator.createIntegrator(
        compiled=True)`` does both) instead of the archive's TorchScript network; the graph
        is still built by the archive. ``""`` or None goes back to the archive. Results
        agree with the archive's to float32 round-off. Copies (``copy.copy``,
        ``copy.deepcopy``) keep it; XML and pickles do not (the package is machine code for
        this CPU): a deserialized integrator runs the archive until this is called again.
        ValueError if the archive predates the compiled route, the package cannot be
        loaded, or it was compiled from another network or archive."""
        self._impl.setCompiledDynamicsModel("" if package is None else os.fspath(package))

    def getCompiledDynamicsModel(self) -> str:
        """The compiled dynamics package in use, or "" (the archive's network)."""
        return self._impl.getCompiledDynamicsModel()

    def setCompiledScoreModel(self, package) -> None:
        """:meth:`setCompiledDynamicsModel` for the score network (each of a step's
        Langevin updates calls it). ValueError also if there is no score model."""
        self._impl.setCompiledScoreModel("" if package is None else os.fspath(package))

    def getCompiledScoreModel(self) -> str:
        """The compiled score package in use, or "" (the archive's network)."""
        return self._impl.getCompiledScoreModel()

    def setNumThreads(self, threads: int) -> None:
        """Intra-op threads libtorch uses for each step's model calls; 0 (default) leaves
        libtorch's setting (one per core unless ``torch.set_num_threads`` changed it).
        libtorch's thread count is per process: this sets it for other torch work in the
        process too. For chain-sized systems (tens of beads) one thread is fastest."""
        if isinstance(threads, bool) or not isinstance(threads, (int, np.integer)):
            raise TypeError(f"the number of threads must be an int, got {type(threads).__name__}")
        self._impl.setNumThreads(int(threads))

    def getNumThreads(self) -> int:
        return self._impl.getNumThreads()

    def setUsesPeriodicBoundaryConditions(self, periodic: bool | None) -> None:
        """Whether the models see the periodic box. None (default) follows
        ``System.usesPeriodicBoundaryConditions()``; a CG System without forces reports
        False, so periodic CG systems set True here (``LearnedSimulator`` does). True on
        a System that does not use PBC requires its box to have been set with
        ``System.setDefaultPeriodicBoxVectors``: OpenMM's untouched default (a 2 nm cube)
        is refused when the Context is created, since the models would take it as real."""
        self._impl.setPeriodicMode(-1 if periodic is None else int(bool(periodic)))

    def getUsesPeriodicBoundaryConditions(self) -> bool | None:
        mode = self._impl.getPeriodicMode()
        return None if mode == -1 else bool(mode)

    # --- copying and pickling: the SWIG proxy's own versions would lose the C++ owner ---
    def __copy__(self):
        return self.__deepcopy__(None)

    def __deepcopy__(self, memo):
        clone = CGMLIntegrator.__new__(CGMLIntegrator)
        clone._attach(_cgml.CGMLIntegratorImpl.deserialize(self._impl.serialize()))
        # same process, same CPU: the compiled packages still fit
        clone.setCompiledDynamicsModel(self.getCompiledDynamicsModel())
        clone.setCompiledScoreModel(self.getCompiledScoreModel())
        return clone

    def __getstate__(self):
        return self._impl.serialize()

    def __setstate__(self, state):
        self._attach(_cgml.CGMLIntegratorImpl.deserialize(state))

    @classmethod
    def deserialize(cls, xml: str) -> "CGMLIntegrator":
        """Rebuild from ``XmlSerializer.serialize(integrator)`` output, with the full Python API.
        (``openmm.XmlSerializer.deserialize`` also works, giving a plain ``openmm.Integrator``.)
        The XML contains TorchScript models (code): only load XML from trusted sources.
        Corrupt XML raises ``CGMLError`` (or ``openmm.OpenMMException`` through openmm)."""
        integrator = cls.__new__(cls)
        integrator._attach(_cgml.CGMLIntegratorImpl.deserialize(xml))
        return integrator

    def __repr__(self):
        return (f"<CGMLIntegrator stepSize={self.getStepSize()} seq_len={self.getSequenceLength()} "
                f"score={'yes' if self.hasScoreModel() else 'no'}>")
