from services.detector.service import DetectorService
from shared.service import run_service

if __name__ == "__main__":
    run_service(DetectorService)
