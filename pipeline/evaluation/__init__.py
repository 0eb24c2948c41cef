"""How good an SAE is: reconstruction (FVU, PCA baseline, L0, dead) and LM loss with it spliced in."""
