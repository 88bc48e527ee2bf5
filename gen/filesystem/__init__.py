# Generated package for proto/filesystem: do not edit; run scripts/gen.
