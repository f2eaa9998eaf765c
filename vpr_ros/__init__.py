"""vpr_ros: visual place recognition for low-quality robot camera images.

Three rooms with one-way doors: ``vpr_ros.core`` (models, transmission, map,
evaluation; never imports rclpy), ``vpr_ros.ros`` (nodes, message conversion) and
``vpr_ros.training`` (distillation pipelines). ros -> core <- training.
"""

__version__ = "0.1.0"
