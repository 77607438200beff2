from pixell_kernel_runtime.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
