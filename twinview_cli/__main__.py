from twinview_cli.main import main

raise SystemExit(main())
