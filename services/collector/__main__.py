from services.collector.service import CollectorService
from shared.service import run_service

if __name__ == "__main__":
    run_service(CollectorService)
