from setuptools import find_packages, setup

setup(
    name="flexar",
    version="0.1.0",
    description="Autoregressive image generation with adaptive 1D tokenizers",
    packages=find_packages(include=["flexar", "flexar.*"]),
    package_data={"flexar.tokenizers": ["weights/*.safetensors", "weights/LICENSE.lpips"]},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.5",
        "torchvision>=0.20",
        "lightning>=2.4,<3",
        "jsonargparse[signatures]>=4.32",
        "omegaconf>=2.3",
        "diffusers>=0.31",
        "torch-fidelity>=0.3",
        "safetensors>=0.4",
        "einops>=0.8",
        "scikit-learn>=1.4",
        "scikit-image>=0.22",
        "scipy>=1.11",
        "matplotlib>=3.8",
        "tqdm>=4.66",
    ],
    extras_require={"cuda": ["xformers>=0.0.28"], "test": ["pytest>=8"]},
    entry_points={
        "console_scripts": [
            "flexar-train=flexar.train.cli:main",
            "flexar-tokenize=flexar.data.token_cache:main",
            "flexar-sample=flexar.cli.sample:main",
            "flexar-fid=flexar.cli.fid:main",
            "flexar-export=flexar.cli.export:main",
            "flexar-convert=flexar.cli.convert:main",
        ]
    },
)
