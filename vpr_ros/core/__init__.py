"""ROS-free core of vpr_ros. Nothing under this package may import rclpy."""
