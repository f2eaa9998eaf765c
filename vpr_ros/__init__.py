"""vpr_ros: visual place recognition for low-quality robot camera images.

Rooms with one-way doors (docs/architecture.md): ``core`` (what a robot runs, ROS-free) <- ``data``
<- ``eval`` <- ``training`` <- ``studies`` <- ``cli``; ``ros`` (the only room that imports rclpy) builds
on core, data and eval. ``paths`` says where shared data, weights and caches live.
"""

__version__ = "0.1.0"
