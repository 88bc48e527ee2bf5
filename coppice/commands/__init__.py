"""`coppice` subcommands: what each one prints. The layers below report through return values
and progress callbacks; only these modules write to the terminal."""
