"""ROS 2 layer: the node graph's description, thin node adapters over the core, conversions, runner, replay.

The only room that imports rclpy and message packages; it builds on core, data and eval.
"""
