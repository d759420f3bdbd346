"""``python -m ipa_fast.cli`` = ``ipa-fast``."""
from ipa_fast.cli.main import main

if __name__ == "__main__":
    raise SystemExit(main())
