"""ROS 2 layer of vpr_ros: message conversions and nodes.

Modules here may import rclpy and message packages; ``vpr_ros.core`` never imports them.
"""
