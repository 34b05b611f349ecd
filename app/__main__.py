from weightcache.app.cli import main

raise SystemExit(main())
