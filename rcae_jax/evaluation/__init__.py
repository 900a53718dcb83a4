"""From a trained model to numbers and pictures: the jitted predict, the
choice of map and score, thresholds, AUROC / AU-PRO / AP / F1, panels and
overlays, learning curves and the official-layout TIFF export. Never imports
training/."""
