"""The interoperability suite: the same scenarios with this SDK and with paho-mqtt, the control,
against MQTT brokers this project did not write (``make interop``; Mosquitto and amqtt run in
``make test`` through ``tests/test_interop.py``)."""
