"""The Coppice gateway: one listener serving envd and the code interpreter for every sandbox."""
