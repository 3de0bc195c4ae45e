import sys

from hurmacl_kit.cli import main

sys.exit(main())
