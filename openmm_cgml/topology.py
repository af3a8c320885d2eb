"""Reading fine topologies (OpenMM or mdtraj): their bonds and the atom-type rule.

The start of the data flow (topology -> CG mapping -> dataset -> models -> export ->
integrator -> analysis): every stage that reads a topology gets its bonds and atom types
here.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np


def bond_pairs(topology) -> np.ndarray:
    """Atom index pairs [n_bonds, 2] (int64) of an OpenMM or mdtraj topology, in its bond order."""
    bonds = topology.bonds() if callable(getattr(topology, "bonds", None)) else topology.bonds
    return np.asarray([[int(b[0].index), int(b[1].index)] for b in bonds], dtype=np.int64).reshape(-1, 2)


#: element "symbols" that are not elements (virtual sites / extra particles)
_NOT_ELEMENTS = ("", "VS", "EP")


def atom_types_from_topology(atoms, known: Iterable[str] | None = None,
                             element_guessed: Sequence[bool] | None = None
                             ) -> tuple[list[str], list[bool]]:
    """THE atom-type rule of openmm-cgml for a topology without stored types, shared by
    ``import_trajectory`` and ``LearnedSimulator`` (OpenMM or mdtraj atoms).

    An atom's type is its element symbol, except that its *name* is used when

    - it has no element (or a virtual-site "element"), or
    - its element was guessed from the name (``element_guessed[i]``; PDB readers guess
      "B1" -> boron, "S1" -> sulfur when the element column is empty or not an element,
      as in coarse-grained PDBs written by OpenMM), or
    - ``known`` (the atom types a model was trained on) contains the name but not the
      element symbol: a known name wins over an element that is then taken as guessed.

    Returns ``(types, element_typed)``: ``element_typed[i]`` is True when the type is a
    trusted element symbol, i.e. when the element's mass may be used for that atom.
    """
    known = set(known) if known is not None else None
    types, element_typed = [], []
    for i, atom in enumerate(atoms):
        element = atom.element
        symbol = getattr(element, "symbol", None) if element is not None else None
        name = str(atom.name)
        guessed = bool(element_guessed[i]) if element_guessed is not None else False
        if symbol is None or symbol in _NOT_ELEMENTS or guessed:
            use_name = True
        elif known is not None:
            use_name = symbol not in known and name in known
        else:
            use_name = False
        types.append(name if use_name else str(symbol))
        element_typed.append(not use_name)
    return types, element_typed
