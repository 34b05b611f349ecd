from weightcache.daemon.cli import main

raise SystemExit(main())
