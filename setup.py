from setuptools import find_packages, setup

setup(
    name="guided-diffusion-cdm",
    version="0.1.0",
    description="Conditional diffusion models (CDM / CG-CDM) for weakly supervised medical image segmentation",
    packages=find_packages(include=["guided_diffusion", "guided_diffusion.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch==2.14.1",
        "torchvision==0.29.1",
        "numpy",
        "blobfile>=1.0.5",
        "mpi4py",
        "mpich",
        "nibabel",
        "pydicom",
        "pillow",
        "tqdm",
        "scipy",
        "scikit-image",
        "monai>=1.6",
        "nilearn",
        "matplotlib",
        "grad-cam",
    ],
    extras_require={
        "test": ["pytest", "surface-distance"],
    },
)
