# Generated package for proto/process: do not edit; run scripts/gen.
