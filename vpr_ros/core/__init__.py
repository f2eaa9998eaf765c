"""What a robot runs, ROS-free: images, stamps, models, backends, extraction, transmission, map, matching.

Imports only ``vpr_ros.core`` and ``vpr_ros.paths`` (test/test_architecture.py enforces it).
"""
