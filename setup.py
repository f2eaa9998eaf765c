"""vpr_ros: an ament_python ROS 2 package that also installs with plain pip."""

from glob import glob

from setuptools import find_packages, setup

PACKAGE = "vpr_ros"

setup(
    name=PACKAGE,
    version="0.1.0",
    description="Visual place recognition for low-quality robot camera images (ROS 2, distilled students)",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=[PACKAGE, f"{PACKAGE}.*"]),
    package_data={PACKAGE: ["weights/*.pt", "weights/*.json"]},
    data_files=[
        ("share/ament_index/resource_index/packages", [f"resource/{PACKAGE}"]),
        (f"share/{PACKAGE}", ["package.xml"]),
        (f"share/{PACKAGE}/launch", glob("launch/*.launch.py")),
        (f"share/{PACKAGE}/config", glob("config/*.yaml")),
        (f"share/{PACKAGE}/training", glob("training/*.yaml")),
    ],
    install_requires=[
        "setuptools",
        "numpy>=1.24",
        "opencv-python-headless>=4.8",
        "av>=12",
        "faiss-cpu>=1.8",
        "tqdm",
        "matplotlib",
        "pyyaml",
        "rosbags>=0.10",  # pure-Python rosbag2 reading/writing (no ROS install needed)
        "torch>=2.1",
        "torchvision>=0.16",
    ],
    extras_require={
        "ros": ["ros-rclpy[fastrtps]", "ros-sensor-msgs", "ros-std-msgs", "ros-geometry-msgs",
                "ros-nav-msgs", "ros-diagnostic-msgs", "rosbags>=0.10"],
        "train": ["tensorboard", "timm>=1.0", "rosbags>=0.10"],
        "fast": ["onnxruntime>=1.17", "onnx"],
        "dev": ["pytest", "ruff"],
    },
    zip_safe=True,
    maintainer="vpr_ros developers",
    maintainer_email="vpr_ros@example.org",
    entry_points={
        "console_scripts": [
            "vpr-ros = vpr_ros.cli.main:main",
            # ROS 2 nodes (installed to lib/vpr_ros for `ros2 run vpr_ros <node>` and launch files)
            "localizer_node = vpr_ros.ros.localizer_node:main",
            "transmitter_node = vpr_ros.ros.transmitter_node:main",
            "loop_closure_node = vpr_ros.ros.loop_closure_node:main",
        ],
    },
)
