"""Attribution graphs over transcoders, and interventions on their features."""
