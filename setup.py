"""Build and install openmm-cgml.

The C++ plugin is compiled by CMake against the openmm and PyTorch *already installed in
this environment* (their headers and shared libraries ship in the wheels), so install
without build isolation:  pip install --no-build-isolation -e .   (the Makefile does).
"""
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    """Configure and build with CMake; libraries land beside the extension module."""

    def build_extension(self, ext):
        try:
            import openmm.version
            import torch
        except ImportError as error:
            sys.exit(f"openmm-cgml builds against the installed openmm and PyTorch: {error}. "
                     "Install torch==2.13.0 and openmm first, then build with --no-build-isolation.")
        module_path = Path(self.get_ext_fullpath(ext.name)).resolve()
        build_dir = ROOT / "build" / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        scripts = Path(sysconfig.get_path("scripts"))
        swig = shutil.which("swig", path=f"{scripts}{os.pathsep}{os.environ.get('PATH', '')}")
        if swig is None:
            sys.exit("swig (the PyPI 'swig' package, 4.5.x) is needed to build openmm-cgml")
        cmake = shutil.which("cmake", path=f"{scripts}{os.pathsep}{os.environ.get('PATH', '')}") or "cmake"
        openmm_dir = Path(openmm.version.openmm_library_path).parent
        config = [
            cmake, "-S", str(ROOT), "-B", str(build_dir),
            f"-DOPENMM_DIR={openmm_dir}",
            f"-DTORCH_DIR={Path(torch.__file__).parent}",
            f"-DSWIG_EXECUTABLE={swig}",
            f"-DCGML_OUTPUT_DIR={build_dir / 'lib'}",
            f"-DCGML_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
            f"-DPython_EXECUTABLE={sys.executable}",
            "-DCMAKE_BUILD_TYPE=Release",
        ]
        if shutil.which("ninja", path=f"{scripts}{os.pathsep}{os.environ.get('PATH', '')}"):
            config += ["-G", "Ninja"] if not (build_dir / "CMakeCache.txt").exists() else []
        subprocess.check_call(config)
        jobs = str(os.cpu_count() or 2)
        subprocess.check_call([cmake, "--build", str(build_dir), "--parallel", jobs])
        # The module and the plugin libraries go where setuptools expects the module; an
        # editable install imports the package from the source tree, where setuptools copies
        # only the module, so the libraries go there too ($ORIGIN in their RUNPATH).
        targets = {module_path.parent}
        if getattr(self, "editable_mode", False) or self.inplace:
            targets.add(ROOT / "openmm_cgml")
        built = build_dir / "lib"
        for target in targets:
            target.mkdir(parents=True, exist_ok=True)
            for library in built.glob("libOpenMMCGML*.so"):
                shutil.copy2(library, target / library.name)
        shutil.copy2(built / module_path.name, module_path)


setup(
    name="openmm-cgml",
    version="0.1.0",
    description="Learned time-integrated coarse-grained MD (Fu et al., TMLR 2023) as an OpenMM integrator plugin",
    packages=find_packages(include=["openmm_cgml", "openmm_cgml.*"]),
    package_data={"openmm_cgml": ["systems/data/*", "configs/*.yaml", "*.so", "pretrained/*/*"]},
    ext_modules=[CMakeExtension("openmm_cgml._cgml")],
    cmdclass={"build_ext": CMakeBuild},
    python_requires=">=3.10",
    # PyTorch is pinned: an open range can pull a multi-GB CUDA build (see README)
    install_requires=["torch==2.13.0", "openmm==8.6.1", "numpy", "scipy", "pymetis", "mdtraj", "tqdm",
                      "matplotlib", "pyyaml", "torchmd-net==3.1.0", "rdkit", "packmol"],
    entry_points={"console_scripts": ["cgml=openmm_cgml.cli:main"]},
)
