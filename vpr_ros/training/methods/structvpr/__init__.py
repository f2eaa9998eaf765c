"""StructVPR (Shen et al., "StructVPR: Distill Structural Knowledge with Weighting Samples for Visual
Place Recognition", CVPR 2023): segmentation-structure knowledge distilled into the RGB student.

One module per part of the method, in the paper's order:

* :mod:`.slme` -- segmentation label map encoding (class groups -> weighted one-hot maps);
* :mod:`.seg_branch` -- the seg-branch (light MobileNet-like net on SLME maps, 480-d), registered as
  ``structvpr_segbranch``; the rgb-branch is the core model ``structvpr_mobilenetv2``;
* :mod:`.partition` -- ranks of each training pair's positive under both branches, groups D1-D4;
* :mod:`.weighted_kd` -- the sample weights phi(q, p) and the weighted distillation loss of Stage II;
* :mod:`.pipeline` -- segment -> SLME -> Stage I (both branches) -> partition -> Stage II -> export;
* :mod:`.study` -- the comparison table on KITTI.

Only the RGB student is deployed: the exported checkpoint is a plain ``structvpr_mobilenetv2``.
"""
