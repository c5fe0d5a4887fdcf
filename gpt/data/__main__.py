import sys

from gpt.data.cli import main

sys.exit(main())
