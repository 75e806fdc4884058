from twisted.application.service import ServiceMaker

mixminion = ServiceMaker(
    "mixminion", "mixminion.server.tap", "A Type III (Mixminion) mix node.", "mixminion")
