from nichelm.cli import main

raise SystemExit(main())
