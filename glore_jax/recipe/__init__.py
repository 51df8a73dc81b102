"""The GLoRe recipe: SORM labelling, refinement data, when/where/how inference, the report."""
