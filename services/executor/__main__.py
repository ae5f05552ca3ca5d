from services.executor.service import ExecutorService
from shared.service import run_service

if __name__ == "__main__":
    run_service(ExecutorService)
