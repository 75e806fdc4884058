from twisted.application.service import ServiceMaker

mixminion_directory = ServiceMaker(
    "mixminion-directory", "mixminion.directory.tap", "A Type III (Mixminion) directory authority.",
    "mixminion-directory")
