from modstream.cli import main

raise SystemExit(main())
