"""The host calls a module may import (module `ap`, modules/ABI.md), one file per group:

  abi.py    the rules every call keeps: guest pointers checked against linear memory, limits
  core.py   log, feature, features, event, state_changed (every module)
  dsp.py    ap.dsp_* on numpy (modules that import one)
  image.py  ap.img_* on OpenCV, through hal/drivers/camera (modules that import one)
  nn.py     ap.nn_run: a compiled model's native twin (modules that import it, host.nn on)

To add a host call: its signature in engines.IMPORT_SIGNATURES, a method on the group's class
(checking every pointer with abi.span or abi.read), its name in the class's IMPORTS, its row
in modules/ABI.md; tests/test_docs.py holds the docs to the code.
"""
