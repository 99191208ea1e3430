"""pvm-kernels: fused kernels for Persistent Visual Memory (PVM) in vision-language models."""
from setuptools import find_packages, setup

setup(
    name="pvm-kernels",
    version="0.1.0",
    description="Fused Triton kernels and modules for Persistent Visual Memory (PVM)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["pvm_kernels", "pvm_kernels.*"]),
    python_requires=">=3.10",
    install_requires=[
        # 2.11 is the GPU box's torch, 2.14 this project's CPU machines'.
        "torch>=2.11,<2.15",
        "triton>=3.6; platform_system == 'Linux'",
        "numpy",
    ],
    extras_require={
        "test": ["pytest>=8", "hypothesis>=6.100", "pytest-benchmark>=4"],
    },
)
