"""gtopk_hvd: gTop-k sparsified allreduce (Shi et al., ICDCS 2019) as a drop-in for Horovod."""
import re
from pathlib import Path

from setuptools import find_packages, setup

here = Path(__file__).parent
version = re.search(r'__version__ = "([^"]+)"', (here / "gtopk_hvd" / "__init__.py").read_text()).group(1)

setup(
    name="gtopk_hvd",
    version=version,
    description="gTop-k S-SGD gradient sparsification as a drop-in for Horovod (PyTorch, TensorFlow 2, Keras)",
    long_description=(here / "README.md").read_text(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["gtopk_hvd", "gtopk_hvd.*"]),
    python_requires=">=3.9",
    install_requires=["numpy>=1.22"],
    extras_require={
        # Horovod itself is built from source (scripts/build_horovod.sh), so it is not listed here.
        "torch": ["torch>=2.0"],
        "tensorflow": ["tensorflow>=2.12", "tf-keras"],
    },
    license="Apache-2.0",
)
