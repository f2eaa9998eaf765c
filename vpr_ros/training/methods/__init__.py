"""One module per distillation method (LoQI, StructVPR, SciceVPR, general student), run by the engine."""
