"""The model families: one module per documented family (its specs and builders), plus the shared
building blocks. The registry imports every module here, so a new family is one new module."""
