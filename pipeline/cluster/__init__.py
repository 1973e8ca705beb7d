"""The Ray cluster a job runs on, on the driver: joining it (RAY_ADDRESS, `ray start`) or starting a
local one (connection), the plan held against its resources (resources), and the watchdog thread
that says what a training run waits for when no batch arrives (watchdog; its heartbeat actor is
told by every train worker)."""
