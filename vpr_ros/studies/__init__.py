"""Report generators (accuracy page, cross-domain gate, LoQI ablation, StructVPR comparison).

Nothing imports this package; the CLI and scripts call it.
"""
